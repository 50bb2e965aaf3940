//! The header codec against every entry of the shared test vectors.

use godoxy_agent::protocol::{HEADER_LEN, HeaderError, TunnelHeader, VERSION};

#[test]
fn vectors_copy_matches_shared_when_present() {
    let shared =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/protocol/vectors.json");
    match std::fs::read(&shared) {
        Ok(upstream) => assert_eq!(
            std::fs::read(crate::common::vectors_path()).unwrap(),
            upstream,
            "tests/data/vectors.json differs from ../shared/protocol/vectors.json: copy it again"
        ),
        Err(_) => eprintln!("../shared absent: using the repository's copy of the vectors"),
    }
}

#[test]
fn vector_file_agrees_with_constants() {
    let v = crate::common::vectors();
    assert_eq!(v.header_size, HEADER_LEN);
    assert_eq!(crate::common::hex(&v.version), VERSION);
}

#[test]
fn valid_vectors_decode_and_round_trip() {
    let v = crate::common::vectors();
    assert!(!v.valid.is_empty());
    for vector in &v.valid {
        let bytes: [u8; HEADER_LEN] = vector.bytes().try_into().unwrap();
        let header = TunnelHeader::decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: refused: {e}", vector.name));
        assert_eq!(
            header.host_bytes(),
            vector.host.as_deref().unwrap().as_bytes(),
            "{}",
            vector.name
        );
        assert_eq!(
            header.port_bytes(),
            vector.port.as_deref().unwrap().as_bytes(),
            "{}",
            vector.name
        );
        assert_eq!(header.flag(), vector.flag.unwrap(), "{}", vector.name);
        assert_eq!(header.is_probe(), vector.probe.unwrap(), "{}", vector.name);
        assert_eq!(header.encode(), bytes, "{}: encode differs", vector.name);
        // Built from its fields, the header encodes to the same bytes.
        let built = TunnelHeader::new(
            vector.host.as_deref().unwrap(),
            vector.port.as_deref().unwrap(),
            vector.flag.unwrap(),
        )
        .unwrap();
        assert_eq!(
            built.encode(),
            bytes,
            "{}: built header differs",
            vector.name
        );
        if !header.is_probe() {
            let dest = header
                .destination()
                .unwrap_or_else(|e| panic!("{}: destination refused: {e}", vector.name));
            assert_eq!(
                dest.port.to_string(),
                vector.port.as_deref().unwrap(),
                "{}",
                vector.name
            );
        }
    }
}

#[test]
fn invalid_vectors_are_refused_with_their_reason() {
    let v = crate::common::vectors();
    assert!(!v.invalid.is_empty());
    for vector in &v.invalid {
        let bytes = vector.bytes();
        let got = TunnelHeader::decode_slice(&bytes);
        let why = vector.why.as_deref().unwrap();
        let err = got.expect_err(&vector.name);
        assert_eq!(err.check(), why, "{}: refused as {err:?}", vector.name);
        if why == "short" {
            assert_eq!(err, HeaderError::Short);
        }
    }
}

#[test]
fn rejected_destination_vectors_decode_but_are_refused() {
    let v = crate::common::vectors();
    assert!(!v.rejected_destination.is_empty());
    for vector in &v.rejected_destination {
        let bytes: [u8; HEADER_LEN] = vector.bytes().try_into().unwrap();
        let header = TunnelHeader::decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: should pass the wire checks: {e}", vector.name));
        assert!(!header.is_probe(), "{}", vector.name);
        let err = header.destination().expect_err(&vector.name);
        eprintln!("{}: {err}", vector.name);
    }
}

mod properties {
    use godoxy_agent::protocol::{HEADER_LEN, TunnelHeader};
    use proptest::prelude::*;

    proptest! {
        /// Whatever a peer sends, decoding and the destination check return; they never panic.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let array: [u8; HEADER_LEN] = bytes.try_into().unwrap();
            if let Ok(header) = TunnelHeader::decode(&array) {
                let _ = header.destination();
            }
        }

        /// Any header that fits its fields survives encode -> decode unchanged.
        #[test]
        fn encode_decode_round_trip(
            host in proptest::collection::vec(any::<u8>(), 0..=255),
            port in proptest::collection::vec(any::<u8>(), 0..=5),
            flag in any::<u8>(),
        ) {
            let header = TunnelHeader::from_raw(&host, &port, flag).unwrap();
            let back = TunnelHeader::decode(&header.encode()).unwrap();
            prop_assert_eq!(back.host_bytes(), &host[..]);
            prop_assert_eq!(back.port_bytes(), &port[..]);
            prop_assert_eq!(back.flag(), flag);
        }

        /// A single flipped bit anywhere is caught (by the checksum, or by the field it hits).
        #[test]
        fn any_bit_flip_is_refused(bit in 0..HEADER_LEN * 8) {
            let mut wire = TunnelHeader::new("example.com", "443", 0).unwrap().encode();
            wire[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(TunnelHeader::decode(&wire).is_err());
        }
    }
}
