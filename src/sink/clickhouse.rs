//! A small ClickHouse HTTP client: DDL, RowBinary inserts and RowBinary queries.
//!
//! Works against ClickHouse 18.16 and current releases: it sends nothing but the SQL, the
//! `database` parameter and basic-auth credentials (no query parameters, no settings that old
//! servers reject).

use std::io::Read;
use std::time::Duration;

use crate::config::ClickHouseConfig;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChError {
    /// Connection refused/reset, timeout: the server may be down. Retry.
    #[error("clickhouse unreachable: {0}")]
    Transport(String),
    /// The server answered with an error.
    #[error("clickhouse error (HTTP {status}): {body}")]
    Server { status: u16, body: String },
    #[error("clickhouse response: {0}")]
    Response(String),
}

impl ChError {
    /// Whether the failure may go away by itself. A server error is also retried by the ingest
    /// loop (a sink rejection stops progress instead of dropping data), but is logged louder.
    pub fn is_transient(&self) -> bool {
        match self {
            ChError::Transport(_) => true,
            ChError::Server { status, body } => {
                *status >= 500 && !body.contains("Code: 60,") && !body.contains("Code: 62,")
            }
            ChError::Response(_) => true,
        }
    }
}

#[derive(Clone)]
pub struct ClickHouse {
    agent: ureq::Agent,
    url: String,
    database: String,
    auth: Option<String>,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse").field("url", &self.url).field("database", &self.database).finish()
    }
}

impl ClickHouse {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .build();
        let auth = (!cfg.user.is_empty()).then(|| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cfg.user, cfg.password))
            )
        });
        ClickHouse { agent, url: cfg.url.trim_end_matches('/').to_string(), database: cfg.database.clone(), auth }
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    fn post(&self, query_in_url: Option<&str>, body: &[u8], use_db: bool) -> Result<Vec<u8>, ChError> {
        let mut req = self.agent.post(&format!("{}/", self.url));
        if use_db {
            req = req.query("database", &self.database);
        }
        if let Some(q) = query_in_url {
            req = req.query("query", q);
        }
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        match req.send_bytes(body) {
            Ok(resp) => {
                let mut out = Vec::new();
                resp.into_reader().read_to_end(&mut out).map_err(|e| ChError::Transport(e.to_string()))?;
                Ok(out)
            }
            Err(ureq::Error::Status(status, resp)) => {
                let body = resp.into_string().unwrap_or_default();
                Err(ChError::Server { status, body: body.trim().chars().take(2000).collect() })
            }
            // Not `t.to_string()`: that repeats the URL, i.e. the whole INSERT statement.
            Err(ureq::Error::Transport(t)) => {
                Err(ChError::Transport(format!("{}: {}", t.kind(), t.message().unwrap_or(""))))
            }
        }
    }

    /// Runs a statement (DDL, ALTER), in the configured database unless `use_db` is false.
    pub fn execute(&self, sql: &str, use_db: bool) -> Result<(), ChError> {
        self.post(None, sql.as_bytes(), use_db).map(|_| ())
    }

    /// Runs a query and returns the raw response body (ask for `FORMAT RowBinary` or TSV).
    pub fn query(&self, sql: &str) -> Result<Vec<u8>, ChError> {
        self.post(None, sql.as_bytes(), true)
    }

    /// Inserts `rows` (RowBinary) with `insert` being `INSERT INTO t (cols) FORMAT RowBinary`.
    pub fn insert(&self, insert: &str, rows: &[u8]) -> Result<(), ChError> {
        self.post(Some(insert), rows, true).map(|_| ())
    }

    /// Waits (capped jittered backoff) until ClickHouse answers, for at most `wait`.
    pub fn wait_ready(&self, wait: Duration) -> Result<(), ChError> {
        let deadline = std::time::Instant::now() + wait;
        let mut backoff = crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.ping() {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(url = %self.url, error = %e, retry_ms = delay.as_millis() as u64, "waiting for clickhouse");
                    std::thread::sleep(delay);
                }
            }
        }
    }

    /// `SELECT 1` succeeds.
    pub fn ping(&self) -> Result<(), ChError> {
        self.post(None, b"SELECT 1", false).map(|_| ())
    }
}

/// Quotes a string as a ClickHouse SQL literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn quote_escapes() {
        assert_eq!(super::quote("a'b\\c\nd"), "'a\\'b\\\\c\\x0Ad'");
    }
}
