//! The HTTP surface of `tally-api` (axum on tokio): routes, parameter parsing, error mapping and
//! per-request metrics. Handlers run their credential check and ClickHouse reads on tokio's
//! blocking pool (the ClickHouse client and the verifier are synchronous).
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a status that never reads as data:
//! 400 bad parameters, 401 no or bad credential, 403 outside the credential's tenant or scope,
//! 404 no such route, 422 a total beyond 2^53 − 1 (JSON) or 64 bits, 502 ClickHouse refused the query,
//! 503 ClickHouse unreachable (with `Retry-After`). Never an empty 200.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use super::auth::{Access, Refused};
use super::entitlements::{entitlements, MeterEntitlement};
use super::plans::Plans;
use super::progress::{final_until, Progress};
use super::usage::{usage, UsageQuery, UsageRow, Window};
use crate::invoice::period::parse_time;
use crate::meter::Meters;
use crate::sink::clickhouse::{ChError, ClickHouse, ErrorClass};
use crate::source::worker::now_secs;
use crate::timestamp::format_rfc3339;
use crate::verify::{Credential, Verifier};

/// The OpenAPI 3 document (`schemas/openapi.json`), served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../../schemas/openapi.json");

/// What every handler shares.
pub struct AppState {
    pub ch: ClickHouse,
    pub meters: Meters,
    pub plans: Plans,
    pub verifier: Mutex<Verifier>,
    pub progress: Progress,
    /// `dedupe.window_secs` of the ingest workers (decides `final_until`).
    pub window_secs: i64,
}

/// The routes, with request metrics.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/usage", get(get_usage))
        .route("/v1/entitlements/{org_id}", get(get_entitlements))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "only GET is served".into())
        })
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// `tally_api_requests_total{route,status}` and `tally_api_request_seconds{route}`.
async fn observe(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::histogram!("tally_api_request_seconds", "route" => route.clone()).record(started.elapsed().as_secs_f64());
    metrics::counter!("tally_api_requests_total", "route" => route, "status" => status).increment(1);
    res
}

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: String) -> ApiError {
        ApiError { status, code, message }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut res = (self.status, body).into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer, Basic"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        res
    }
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> ApiError {
        match r {
            Refused::Unauthenticated(reason) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!("credential refused: {}", reason.as_str()),
            ),
            Refused::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", why.into()),
        }
    }
}

impl From<ChError> for ApiError {
    fn from(e: ChError) -> ApiError {
        metrics::counter!("tally_api_clickhouse_errors_total", "class" => match e.class() {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        })
        .increment(1);
        match e {
            ChError::TotalOverflow(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "total_overflow", e.to_string())
            }
            _ if e.class() == ErrorClass::Transient => {
                tracing::warn!(error = %e, "ClickHouse unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "clickhouse_unavailable",
                    format!("usage cannot be read right now (ClickHouse: {e}); retry later"),
                )
            }
            _ => {
                tracing::error!(error = %e, "ClickHouse refused a query");
                ApiError::new(StatusCode::BAD_GATEWAY, "clickhouse_error", format!("ClickHouse refused the query: {e}"))
            }
        }
    }
}

/// Verifies the request's `authorization` header(s) as of now.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Access, ApiError> {
    let values: Vec<&[u8]> = headers.get_all(header::AUTHORIZATION).iter().map(HeaderValue::as_bytes).collect();
    let cred = Credential::from_headers(values.iter().map(|v| ("authorization", Some(*v))));
    let verified = state.verifier.lock().unwrap_or_else(|e| e.into_inner()).verify_scopes(cred, now_secs());
    let (principal, scopes) = verified.map_err(Refused::Unauthenticated)?;
    Ok(Access::of(principal, scopes)?)
}

/// Runs blocking work (credential checks, ClickHouse) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("request handler failed: {e}")))
    })
}

/// How complete the figures are, carried by every answer.
#[derive(Debug, Serialize)]
struct Completeness {
    /// RFC 3339; every event with a Kafka timestamp before it is counted. `null`: not known yet
    /// (the ingest group's progress could not be read since start).
    complete_until: Option<String>,
    /// RFC 3339; hours before it no longer change. `null` with `complete_until`.
    final_until: Option<String>,
}

fn completeness(state: &AppState) -> Completeness {
    let snap = state.progress.get();
    Completeness {
        complete_until: snap.map(|s| format_rfc3339(s.complete_until)),
        final_until: snap.map(|s| format_rfc3339(final_until(s.complete_until, state.window_secs))),
    }
}

#[derive(Debug, Serialize)]
struct UsageAnswer {
    data: Vec<UsageRow>,
    #[serde(flatten)]
    completeness: Completeness,
    /// Notes about the answer, e.g. that an org has no usage at all in the range.
    warnings: Vec<String>,
}

/// Parses the query string of `/v1/usage` (before the credential narrows org and project).
fn parse_usage_query(raw: Option<&str>) -> Result<UsageQuery, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| ApiError::bad(format!("bad query string: {e}")))?;
    let (mut from, mut to, mut org, mut project, mut window, mut group_by) = (None, None, None, None, None, None);
    let mut meters = Vec::new();
    for (k, v) in pairs {
        let once = |slot: &mut Option<String>, v: String| {
            if slot.replace(v).is_some() {
                Err(ApiError::bad(format!("parameter {k} given twice")))
            } else {
                Ok(())
            }
        };
        match k.as_str() {
            "from" => once(&mut from, v)?,
            "to" => once(&mut to, v)?,
            "org_id" => once(&mut org, v)?,
            "project_id" => once(&mut project, v)?,
            "window" => once(&mut window, v)?,
            "group_by" => once(&mut group_by, v)?,
            "meter" => meters.extend(v.split(',').filter(|m| !m.is_empty()).map(str::to_string)),
            _ => return Err(ApiError::bad(format!("unknown parameter {k:?}"))),
        }
    }
    let time = |name: &str, v: Option<String>| -> Result<i64, ApiError> {
        let v = v.ok_or_else(|| ApiError::bad(format!("parameter {name} is required")))?;
        parse_time(&v).map_err(|e| ApiError::bad(format!("{name}: {e}")))
    };
    let window = match window.as_deref() {
        None => Window::None,
        Some(w) => Window::parse(w)
            .ok_or_else(|| ApiError::bad(format!("window must be hour, day, month or none, not {w:?}")))?,
    };
    let mut by_project = false;
    for g in group_by.as_deref().unwrap_or("").split(',').filter(|g| !g.is_empty()) {
        match g {
            "project_id" => by_project = true,
            "meter" | "org_id" => {} // always grouped by org and meter
            _ => return Err(ApiError::bad(format!("group_by takes project_id, meter or org_id, not {g:?}"))),
        }
    }
    let nonempty = |name: &str, v: Option<String>| match v {
        Some(s) if s.is_empty() => Err(ApiError::bad(format!("{name} must not be empty"))),
        v => Ok(v),
    };
    meters.sort();
    meters.dedup();
    Ok(UsageQuery {
        from: time("from", from)?,
        to: time("to", to)?,
        org: nonempty("org_id", org)?,
        project: nonempty("project_id", project)?,
        meters,
        window,
        by_project,
    })
}

async fn get_usage(State(state): State<Arc<AppState>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let run = blocking(move || {
        let access = authorize(&state, &headers)?;
        let mut q = parse_usage_query(raw.as_deref())?;
        (q.org, q.project) = access.scope(q.org.take(), q.project.take())?;
        q.check(&state.meters).map_err(|e| ApiError::bad(e.0))?;
        // Read the progress first: what it says was counted is in ClickHouse before the query.
        let completeness = completeness(&state);
        let data = usage(&state.ch, &state.meters, &q)?;
        let mut warnings = Vec::new();
        if data.iter().all(|r| r.value == 0) {
            // Zeros are stated, never left to an empty list (PRODUCT.md §11), also for an admin's
            // query over every org (until 2026-12-01 that one was an empty 200 with no word;
            // found by a review).
            warnings.push(format!(
                "no usage recorded for {}{} in [{}, {}): the figures are zeros",
                q.org.as_ref().map(|o| format!("org_id {o:?}")).unwrap_or_else(|| "any org".into()),
                q.project.as_ref().map(|p| format!(" project_id {p:?}")).unwrap_or_default(),
                format_rfc3339(q.from),
                format_rfc3339(q.to)
            ));
        }
        Ok(UsageAnswer { data, completeness, warnings })
    });
    match run.await {
        Ok(a) => Json(a).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Serialize)]
struct EntitlementsAnswer {
    org_id: String,
    /// The org's plan, `null` when it has none (then nothing is limited).
    plan: Option<String>,
    /// False when any hard limit is reached.
    has_access: bool,
    entitlements: Vec<EntitlementItem>,
    #[serde(flatten)]
    completeness: Completeness,
    /// Notes about the answer (PRODUCT.md §11: an org without usage gets zeros, stated as such):
    /// no plan, or no usage recorded in any limited meter's current period.
    warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
struct EntitlementItem {
    #[serde(flatten)]
    entitlement: MeterEntitlement,
    complete_until: Option<String>,
}

async fn get_entitlements(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(org)) = path else {
        return ApiError::bad("org_id in the path is not valid UTF-8 text").into_response();
    };
    let run = blocking(move || {
        authorize(&state, &headers)?.entitlements_of(&org)?;
        let completeness = completeness(&state);
        let plan = state.plans.for_org(&org);
        let items = match plan {
            Some(p) => entitlements(&state.ch, &state.meters, &org, p, now_secs())?,
            None => Vec::new(),
        };
        let warnings = entitlement_warnings(&org, plan.is_some(), &items);
        Ok(EntitlementsAnswer {
            warnings,
            plan: plan.map(|p| p.plan.clone()),
            has_access: items.iter().all(|e| e.has_access),
            entitlements: items
                .into_iter()
                .map(|entitlement| EntitlementItem { entitlement, complete_until: completeness.complete_until.clone() })
                .collect(),
            org_id: org,
            completeness,
        })
    });
    match run.await {
        Ok(a) => Json(a).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The `warnings` of an entitlements answer: an org without a plan is limited in nothing; an org
/// with no usage in any limited meter's period has zeros, which may mean it is unknown.
fn entitlement_warnings(org: &str, has_plan: bool, items: &[MeterEntitlement]) -> Vec<String> {
    if !has_plan {
        return vec![format!("org_id {org:?} has no plan and there is no default plan: nothing is limited")];
    }
    if !items.is_empty() && items.iter().all(|e| e.used == 0) {
        let periods: std::collections::BTreeSet<(&str, &str)> =
            items.iter().map(|e| (e.period_start.as_str(), e.period_end.as_str())).collect();
        let periods: Vec<String> = periods.into_iter().map(|(a, b)| format!("[{a}, {b})")).collect();
        return vec![format!("no usage recorded for org_id {org:?} in {}: the figures are zeros", periods.join(", "))];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_parameters_are_checked() {
        let q = parse_usage_query(Some(
            "from=2026-11-01&to=2026-11-02T00:00:00Z&meter=events,input_tokens&meter=events&window=day&group_by=project_id,meter",
        ))
        .unwrap();
        assert_eq!(q.meters, vec!["events".to_string(), "input_tokens".to_string()]);
        assert_eq!(q.window, Window::Day);
        assert!(q.by_project);
        assert_eq!(q.to - q.from, 86_400);
        for (raw, want) in [
            ("to=2026-11-02", "from is required"),
            ("from=2026-11-01&to=2026-11-02&colour=red", "unknown parameter"),
            ("from=2026-11-01&from=2026-11-01&to=2026-11-02", "twice"),
            ("from=yesterday&to=2026-11-02", "from:"),
            ("from=2026-11-01&to=2026-11-02&window=week", "window"),
            ("from=2026-11-01&to=2026-11-02&group_by=type", "group_by"),
            ("from=2026-11-01&to=2026-11-02&org_id=", "org_id must not be empty"),
        ] {
            let e = parse_usage_query(Some(raw)).unwrap_err();
            assert!(e.message.contains(want), "{raw}: {}", e.message);
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }
}
