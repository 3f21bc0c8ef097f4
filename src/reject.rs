//! Why a message or an event cannot be billed. The strings are part of the public contract.

/// A rejection reason, written to the `tally-reject-reason` header of a dead-lettered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    MissingCredentials,
    InvalidCredentials,
    ExpiredCredentials,
    RevokedCredentials,
    ForbiddenScope,
    Malformed,
    TooLarge,
    TooOld,
    FutureTimestamp,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::MissingCredentials,
        Reason::InvalidCredentials,
        Reason::ExpiredCredentials,
        Reason::RevokedCredentials,
        Reason::ForbiddenScope,
        Reason::Malformed,
        Reason::TooLarge,
        Reason::TooOld,
        Reason::FutureTimestamp,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MissingCredentials => "missing_credentials",
            Reason::InvalidCredentials => "invalid_credentials",
            Reason::ExpiredCredentials => "expired_credentials",
            Reason::RevokedCredentials => "revoked_credentials",
            Reason::ForbiddenScope => "forbidden_scope",
            Reason::Malformed => "malformed",
            Reason::TooLarge => "too_large",
            Reason::TooOld => "too_old",
            Reason::FutureTimestamp => "future_timestamp",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
