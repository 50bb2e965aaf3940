//! SIGHUP: the CA, certificate and key are read again for new handshakes (TCP and DTLS);
//! tunnels open across the reload keep their bytes; a broken new file leaves the old set in
//! force. And the expiry warning at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use godoxy_agent::protocol::TunnelHeader;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use crate::common::{Running, TcpEcho, UdpEcho, field, run};
use crate::identity::{Pki, tcp_echoes, udp_echoes};

fn in_days(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

async fn hangup(agent: &Running) {
    let pid = agent.child.id().unwrap();
    let out = run(Command::new("kill").arg("-HUP").arg(pid.to_string())).await;
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn sighup_swaps_the_certificates_for_new_handshakes_only() {
    let old = Pki::new("Old CA");
    let new = Pki::new("New CA");
    let config = old.path("agent.toml");
    // The server certificate lives 30 days: a 40-day warning fires at start-up.
    std::fs::write(&config, old.config_text("expiry_warning = \"40d\"", "")).unwrap();
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening", "udp=127.0.0.1:"]).await;
    let warning = agent
        .wait_for(&["server certificate expires soon", "days_left=29"])
        .await;
    assert!(warning.contains("WARN"), "{warning}");
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();
    let udp: SocketAddr = field(&listening, "udp").parse().unwrap();
    let (tcp_echo, udp_echo) = (TcpEcho::start().await, UdpEcho::start().await);
    // Both clients trust both server certificates: only the agent decides.
    let old_client = old.tls_trusting_both(&new, &old.client("old-client", &[], 1, in_days(10)));
    let new_client = new.tls_trusting_both(&old, &new.client("new-client", &[], 2, in_days(10)));

    // A tunnel opened with the old set.
    let header = TunnelHeader::new(
        &tcp_echo.addr.ip().to_string(),
        &tcp_echo.addr.port().to_string(),
        0,
    )
    .unwrap();
    let mut open = old_client.open_tunnel(addr, &header).await.unwrap();
    open.write_all(b"before reload").await.unwrap();
    let mut back = [0u8; 13];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"before reload");
    assert!(!tcp_echoes(&new_client, addr, tcp_echo.addr).await);

    // The new CA, certificate and key replace the files; SIGHUP.
    for name in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(new.path(name), old.path(name)).unwrap();
    }
    hangup(&agent).await;
    let reloaded = agent.wait_for(&["TLS material reloaded"]).await;
    assert!(reloaded.contains("CN=godoxy.agent"), "{reloaded}");

    // The open tunnel goes on.
    open.write_all(b"after reload!").await.unwrap();
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"after reload!");
    // New handshakes need the new CA, on TCP and DTLS.
    assert!(tcp_echoes(&new_client, addr, tcp_echo.addr).await);
    assert!(udp_echoes(&new_client, udp, udp_echo.addr).await);
    assert!(!tcp_echoes(&old_client, addr, tcp_echo.addr).await);
    assert!(!udp_echoes(&old_client, udp, udp_echo.addr).await);

    // A broken certificate file: logged with its name, the set in force stays.
    std::fs::write(old.path("server.pem"), "not a certificate\n").unwrap();
    hangup(&agent).await;
    let failed = agent.wait_for(&["TLS reload failed"]).await;
    assert!(failed.contains("ERROR"), "{failed}");
    assert!(failed.contains("tls.cert"), "{failed}");
    assert!(
        failed.contains(&old.path("server.pem").display().to_string()),
        "{failed}"
    );
    assert!(tcp_echoes(&new_client, addr, tcp_echo.addr).await);
    assert!(udp_echoes(&new_client, udp, udp_echo.addr).await);
    assert!(!tcp_echoes(&old_client, addr, tcp_echo.addr).await);

    // The first tunnel still carries bytes, and ends normally.
    open.write_all(b"still here!!!").await.unwrap();
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here!!!");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let closed = agent
        .wait_for(&["tunnel closed", "reason=eof", "up_bytes=39"])
        .await;
    assert_eq!(field(&closed, "down_bytes"), "39", "{closed}");
}
