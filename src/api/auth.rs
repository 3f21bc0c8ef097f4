//! Who may read what (PRODUCT.md §11): credentials as in §2, scopes `usage:read` and `usage:admin`.
//!
//! * `usage:admin`: every org.
//! * `usage:read` without a project (a JWT with no project claim): its own org.
//! * `usage:read` with a project (a JWT with the claim, or an API key pair): its own project.
//!
//! Isolation: a request about another org or project is refused with the same status and body
//! whether that org exists or not, before anything is read from ClickHouse, so neither the answer
//! nor its timing tells one from the other.

use std::sync::Arc;

use crate::reject::Reason;
use crate::verify::{Principal, Scopes};

/// What a verified credential may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Admin,
    Org(Arc<str>),
    Project { org: Arc<str>, project: Arc<str> },
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// HTTP 401: no credential, or one that is invalid, expired or revoked (the §3 reason).
    #[error("{}", .0.as_str())]
    Unauthenticated(Reason),
    /// HTTP 403: a valid credential without the scope, or asking about what it may not see.
    #[error("{0}")]
    Forbidden(&'static str),
}

/// The one message for every request outside the caller's tenant (never "not found").
pub const OUTSIDE: &str = "this credential may not read that org or project";

/// Entitlements are org-wide figures: a project credential reads none, its own org's included.
pub const PROJECT_ONLY: &str = "entitlements are org-wide; this credential may read only its project's usage";

impl Access {
    /// From a verified principal and its scopes.
    pub fn of(principal: Principal, scopes: Scopes) -> Result<Access, Refused> {
        if scopes.contains(Scopes::USAGE_ADMIN) {
            return Ok(Access::Admin);
        }
        if !scopes.contains(Scopes::USAGE_READ) {
            return Err(Refused::Forbidden("the credential lacks the usage:read scope"));
        }
        Ok(if principal.project_id.is_empty() {
            Access::Org(principal.org_id)
        } else {
            Access::Project { org: principal.org_id, project: principal.project_id }
        })
    }

    /// Narrows a usage query's `org_id` / `project_id` to what this credential sees: its own
    /// when not given, refused when another is asked for.
    pub fn scope(
        &self,
        org: Option<String>,
        project: Option<String>,
    ) -> Result<(Option<String>, Option<String>), Refused> {
        let own = |asked: Option<String>, mine: &str| match asked {
            None => Ok(Some(mine.to_string())),
            Some(a) if a == mine => Ok(Some(a)),
            Some(_) => Err(Refused::Forbidden(OUTSIDE)),
        };
        match self {
            Access::Admin => Ok((org, project)),
            Access::Org(o) => Ok((own(org, o)?, project)),
            Access::Project { org: o, project: p } => Ok((own(org, o)?, own(project, p)?)),
        }
    }

    /// Whether this credential may read `org`'s entitlements (org-wide figures: an org or admin
    /// credential).
    pub fn entitlements_of(&self, org: &str) -> Result<(), Refused> {
        match self {
            Access::Admin => Ok(()),
            Access::Org(o) if &**o == org => Ok(()),
            Access::Org(_) => Err(Refused::Forbidden(OUTSIDE)),
            // Whatever the org asked for: the answer does not depend on it.
            Access::Project { .. } => Err(Refused::Forbidden(PROJECT_ONLY)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(org: &str, project: &str) -> Principal {
        Principal { org_id: org.into(), project_id: project.into() }
    }

    #[test]
    fn scopes_decide_the_view() {
        let read = Scopes::USAGE_READ;
        assert_eq!(Access::of(p("o", ""), read), Ok(Access::Org("o".into())));
        assert!(matches!(Access::of(p("o", "p"), read), Ok(Access::Project { .. })));
        assert_eq!(Access::of(p("o", "p"), Scopes::USAGE_ADMIN), Ok(Access::Admin));
        assert!(matches!(Access::of(p("o", "p"), Scopes::INGEST), Err(Refused::Forbidden(_))));
    }

    #[test]
    fn other_tenants_are_refused_alike() {
        let org = Access::Org("o".into());
        assert_eq!(org.scope(None, None), Ok((Some("o".into()), None)));
        assert_eq!(org.scope(Some("o".into()), Some("any".into())), Ok((Some("o".into()), Some("any".into()))));
        assert_eq!(org.scope(Some("x".into()), None), Err(Refused::Forbidden(OUTSIDE)));
        let project = Access::Project { org: "o".into(), project: "p".into() };
        assert_eq!(project.scope(None, None), Ok((Some("o".into()), Some("p".into()))));
        assert_eq!(project.scope(None, Some("q".into())), Err(Refused::Forbidden(OUTSIDE)));
        assert_eq!(project.entitlements_of("o"), Err(Refused::Forbidden(PROJECT_ONLY)));
        assert_eq!(project.entitlements_of("x"), Err(Refused::Forbidden(PROJECT_ONLY)));
        assert_eq!(org.entitlements_of("o"), Ok(()));
        assert_eq!(org.entitlements_of("x"), Err(Refused::Forbidden(OUTSIDE)));
        assert_eq!(Access::Admin.scope(Some("x".into()), None), Ok((Some("x".into()), None)));
    }
}
