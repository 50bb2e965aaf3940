//! `/godoxy/agent/info` and the legacy plain-text `/version`, `/name`, `/runtime`.

use hyper::StatusCode;
use hyper::body::Bytes;

use super::{Response, reply};
use crate::config::Config;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// What the info endpoints report, rendered once at start.
pub(crate) struct AgentInfo {
    version: Bytes,
    name: Bytes,
    runtime: Bytes,
    json: Bytes,
}

impl AgentInfo {
    /// From the effective configuration. The version is the GoDoxy release whose agent API
    /// this agent implements (GoDoxy servers pick their protocol by it), not the crate's.
    pub(crate) fn new(config: &Config) -> Self {
        let version = config.godoxy_version.as_str().to_owned();
        let json = serde_json::json!({
            "version": version,
            "name": config.name,
            "runtime": config.runtime.as_str(),
        });
        Self {
            version: Bytes::from(version),
            name: Bytes::from(config.name.clone()),
            runtime: Bytes::from_static(config.runtime.as_str().as_bytes()),
            json: Bytes::from(json.to_string()),
        }
    }

    /// Answers `endpoint` (the path after `/godoxy/agent/`), whatever the method, or `None`
    /// when it is not ours.
    pub(crate) fn handle(&self, endpoint: &str) -> Option<Response> {
        let (content_type, body) = match endpoint {
            "info" => (JSON, &self.json),
            "version" => (TEXT, &self.version),
            "name" => (TEXT, &self.name),
            "runtime" => (TEXT, &self.runtime),
            _ => return None,
        };
        Some(reply(StatusCode::OK, content_type, body.clone()))
    }
}
