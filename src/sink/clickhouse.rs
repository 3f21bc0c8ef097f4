//! A small ClickHouse HTTP client: DDL, RowBinary inserts and RowBinary queries.
//!
//! Works against ClickHouse 18.16 and current releases: it sends nothing but the SQL, the
//! `database` parameter, basic-auth credentials, `wait_end_of_query=1` and, for a few queries,
//! settings every version knows (`max_insert_block_size`, `max_threads`); no query parameters. `wait_end_of_query` makes the server buffer the whole
//! answer before the status line: an error in the middle of a large result is an HTTP error, never
//! a 200 whose body ends in the error's text (which a RowBinary reader could take for rows).

use std::io::Read;
use std::time::Duration;

use crate::config::ClickHouseConfig;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChError {
    /// Connection refused/reset, timeout: the server may be down. Retry.
    #[error("clickhouse unreachable: {0}")]
    Transport(String),
    /// The server answered with an error; `code` is its exception code (from the
    /// `X-ClickHouse-Exception-Code` header, or the `Code: N` that starts the body on servers
    /// that do not send the header, such as 18.16).
    #[error("clickhouse error (HTTP {status}, code {}): {body}", code.map_or("?".to_string(), |c| c.to_string()))]
    Server { status: u16, code: Option<u32>, body: String },
    #[error("clickhouse response: {0}")]
    Response(String),
    /// An INSERT attempt's (or a mend's correction's) staging table was dropped under it: a
    /// worker loading a partition's dedupe state, or mending it, fenced it (docs/exactly-once.md,
    /// "Zombie writers"). Transient: the attempt is re-checked and sent again (the mend starts
    /// over), or stops if its partitions went elsewhere.
    #[error("attempt fenced: its staging table {0} was dropped by a dedupe-state load or a mend")]
    Fenced(String),
    /// A fenced attempt's move out of its staging table (query id `{0}`) was still running on the
    /// server after its table was dropped: on current ClickHouse a `DROP` returns at once while a
    /// query that opened the table keeps going ([`crate::sink::EventStore::fence`]). Transient:
    /// the fence is asked again until the move is over.
    #[error("fence: the move {0} of a fenced attempt is still running on the server")]
    MoveRunning(String),
    /// A total read from ClickHouse cannot be represented exactly where it goes: more than 64
    /// bits (the invoicer, the API), or, in a JSON answer of the API, more than 2^53 − 1. Refused
    /// rather than wrapped or rounded (PRODUCT.md §1); the string names the figure and its
    /// bound. No retry can change it; the events behind it must be looked at.
    #[error("total_overflow: the total of {0}; refusing to report or bill it")]
    TotalOverflow(String),
}

/// Whether retrying a failed request can succeed without someone changing something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server or the network may recover by itself (down, overloaded, timed out).
    Transient,
    /// The server refuses this request as written (unknown table or column, a syntax or size
    /// error, a type mismatch, bad credentials): the same request fails again until the schema,
    /// the server's settings or the configuration change.
    Permanent,
}

/// ClickHouse exception codes (`src/Common/ErrorCodes.cpp`) that no retry of the same request
/// can fix. Everything else, and every failure without a code, is transient.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    36,  // BAD_ARGUMENTS
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    46,  // UNKNOWN_FUNCTION
    47,  // UNKNOWN_IDENTIFIER
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR (also "Max query size exceeded")
    81,  // UNKNOWN_DATABASE
    115, // UNKNOWN_SETTING
    117, // INCORRECT_DATA
    164, // READONLY
    167, // TOO_DEEP_AST
    168, // TOO_BIG_AST (max_ast_elements)
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

impl ChError {
    /// Classifies the failure once, by exception code (never by message text).
    pub fn class(&self) -> ErrorClass {
        match self {
            ChError::Server { code: Some(c), .. } if PERMANENT_CODES.contains(c) => ErrorClass::Permanent,
            // No code: not ClickHouse's own answer (a proxy's); a 4xx other than 408/429 is final.
            ChError::Server { status, code: None, .. }
                if (400..500).contains(status) && !matches!(status, 408 | 429) =>
            {
                ErrorClass::Permanent
            }
            ChError::TotalOverflow(_) => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        }
    }

    /// Whether the failure may go away by itself ([`ErrorClass::Transient`]).
    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// The ClickHouse exception code, if the server sent one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ChError::Server { code, .. } => *code,
            _ => None,
        }
    }
}

/// The exception code of an error answer: the header, else the `Code: N` that starts the body.
fn exception_code(header: Option<&str>, body: &str) -> Option<u32> {
    if let Some(c) = header.and_then(|h| h.trim().parse().ok()) {
        return Some(c);
    }
    let rest = body.trim_start().strip_prefix("Code: ")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
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

    fn post(
        &self,
        query_in_url: Option<&str>,
        body: &[u8],
        use_db: bool,
        settings: &[(&str, &str)],
    ) -> Result<Vec<u8>, ChError> {
        self.post_with(query_in_url, Payload::Bytes(body), use_db, settings)
    }

    fn post_with(
        &self,
        query_in_url: Option<&str>,
        body: Payload<'_>,
        use_db: bool,
        settings: &[(&str, &str)],
    ) -> Result<Vec<u8>, ChError> {
        let mut req = self.agent.post(&format!("{}/", self.url)).query("wait_end_of_query", "1");
        for (k, v) in settings {
            req = req.query(k, v);
        }
        if use_db {
            req = req.query("database", &self.database);
        }
        if let Some(q) = query_in_url {
            req = req.query("query", q);
        }
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        read_response(match body {
            Payload::Bytes(b) => req.send_bytes(b),
            // With its length given, the body is sent as it is read, not chunked (ureq 2).
            Payload::Read { len, reader } => req.set("Content-Length", &len.to_string()).send(reader),
        })
    }

    /// Runs `sql` with `rows` (RowBinary of `structure`, e.g. `o String, p String`) sent along as
    /// the temporary table `name` — ClickHouse's "external data" (a `multipart/form-data` POST,
    /// <https://clickhouse.com/docs/en/engines/table-engines/special/external-data>). The rows are
    /// read as data, not parsed as SQL: no `max_query_size` or `max_ast_elements` limit applies.
    pub fn query_with_table(&self, sql: &str, name: &str, structure: &str, rows: &[u8]) -> Result<Vec<u8>, ChError> {
        // A boundary that occurs nowhere in the rows (event ids are any text, so a fixed one could
        // be forged to cut the part short): random, and drawn again in the unlikely case.
        let boundary = loop {
            let b = format!("tally-{:032x}", rand::random::<u128>());
            if memchr::memmem::find(rows, b.as_bytes()).is_none() {
                break b;
            }
        };
        let boundary = boundary.as_str();
        let mut body = Vec::with_capacity(rows.len() + 256);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(rows);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let mut req = self
            .agent
            .post(&format!("{}/", self.url))
            .query("wait_end_of_query", "1")
            .query("database", &self.database)
            .query("query", sql)
            .query(&format!("{name}_structure"), structure)
            .query(&format!("{name}_format"), "RowBinary")
            .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"));
        if let Some(a) = &self.auth {
            req = req.set("Authorization", a);
        }
        read_response(req.send_bytes(&body))
    }

    /// Runs a statement (DDL, ALTER), in the configured database unless `use_db` is false.
    pub fn execute(&self, sql: &str, use_db: bool) -> Result<(), ChError> {
        self.post(None, sql.as_bytes(), use_db, &[]).map(|_| ())
    }

    /// [`ClickHouse::execute`] in the configured database, with ClickHouse settings for this one
    /// query (sent as URL parameters, which every version accepts; e.g. `("max_threads", "1")`).
    pub fn execute_with(&self, sql: &str, settings: &[(&str, &str)]) -> Result<(), ChError> {
        self.post(None, sql.as_bytes(), true, settings).map(|_| ())
    }

    /// Runs a query and returns the raw response body (ask for `FORMAT RowBinary` or TSV).
    pub fn query(&self, sql: &str) -> Result<Vec<u8>, ChError> {
        self.post(None, sql.as_bytes(), true, &[])
    }

    /// Inserts `rows` (RowBinary) with `insert` being `INSERT INTO t (cols) FORMAT RowBinary`.
    pub fn insert(&self, insert: &str, rows: &[u8]) -> Result<(), ChError> {
        self.insert_with(insert, rows, &[])
    }

    /// [`ClickHouse::insert`] with ClickHouse settings for this one query (see
    /// [`ClickHouse::execute_with`]).
    pub fn insert_with(&self, insert: &str, rows: &[u8], settings: &[(&str, &str)]) -> Result<(), ChError> {
        self.post(Some(insert), rows, true, settings).map(|_| ())
    }

    /// [`ClickHouse::insert_with`] with rows read from `rows`, `len` bytes in all, as they are
    /// sent (no copy of the whole body is made first).
    pub fn insert_read(
        &self,
        insert: &str,
        len: usize,
        rows: &mut dyn std::io::Read,
        settings: &[(&str, &str)],
    ) -> Result<(), ChError> {
        self.post_with(Some(insert), Payload::Read { len, reader: rows }, true, settings).map(|_| ())
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
        self.post(None, b"SELECT 1", false, &[]).map(|_| ())
    }
}

/// A request body: in memory, or read as it is sent (`len` bytes).
enum Payload<'b> {
    Bytes(&'b [u8]),
    Read { len: usize, reader: &'b mut dyn std::io::Read },
}

/// The body of a successful answer, or the error: HTTP status with ClickHouse's exception code,
/// or the transport failure.
fn read_response(r: Result<ureq::Response, ureq::Error>) -> Result<Vec<u8>, ChError> {
    match r {
        Ok(resp) => {
            let mut out = Vec::new();
            resp.into_reader().read_to_end(&mut out).map_err(|e| ChError::Transport(e.to_string()))?;
            Ok(out)
        }
        Err(ureq::Error::Status(status, resp)) => {
            let header = resp.header("X-ClickHouse-Exception-Code").map(str::to_string);
            let body = resp.into_string().unwrap_or_default();
            let code = exception_code(header.as_deref(), &body);
            Err(ChError::Server { status, code, body: body.trim().chars().take(2000).collect() })
        }
        // Not `t.to_string()`: that repeats the URL, i.e. the whole INSERT statement.
        Err(ureq::Error::Transport(t)) => {
            Err(ChError::Transport(format!("{}: {}", t.kind(), t.message().unwrap_or(""))))
        }
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
    use super::*;

    #[test]
    fn errors_are_classified_by_exception_code() {
        let server = |code: Option<u32>| ChError::Server { status: 500, code, body: String::new() };
        assert_eq!(
            exception_code(None, "Code: 62, e.displayText() = DB::Exception: Max query size exceeded"),
            Some(62)
        );
        assert_eq!(exception_code(None, "Code: 60. DB::Exception: Table x doesn't exist"), Some(60));
        assert_eq!(exception_code(Some("241"), "Code: 62, ..."), Some(241));
        assert_eq!(exception_code(None, "Service Unavailable"), None);
        assert_eq!(exception_code(None, "error Code: 62"), None);
        for c in [60, 62, 53, 16, 81, 516] {
            assert_eq!(server(Some(c)).class(), ErrorClass::Permanent, "{c}");
        }
        for c in [159, 241, 252, 202, 209, 210, 3] {
            assert_eq!(server(Some(c)).class(), ErrorClass::Transient, "{c}");
        }
        assert_eq!(server(None).class(), ErrorClass::Transient);
        assert_eq!(ChError::Transport("refused".into()).class(), ErrorClass::Transient);
        assert_eq!(ChError::Server { status: 401, code: None, body: String::new() }.class(), ErrorClass::Permanent);
        assert_eq!(ChError::Server { status: 413, code: None, body: String::new() }.class(), ErrorClass::Permanent);
        assert_eq!(ChError::Server { status: 429, code: None, body: String::new() }.class(), ErrorClass::Transient);
        assert_eq!(server(Some(168)).class(), ErrorClass::Permanent);
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(super::quote("a'b\\c\nd"), "'a\\'b\\\\c\\x0Ad'");
    }
}
