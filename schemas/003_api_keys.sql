-- tally schema, part 3: the shared API key store (PRODUCT.md §2, API key lifecycle).
-- Append-only: one row per change (create, rotate, revoke) with who, when and why — the rows are
-- the audit trail. Every worker folds them into its key table every auth.reload_interval
-- (src/verify/store.rs). Only HMAC-SHA256(pepper, secret) is stored, never a secret.
-- Runs on ClickHouse 18.16 and on current ClickHouse (checked on chDB in CI).

CREATE TABLE IF NOT EXISTS ${database}.api_keys
(
    public_key  String,
    action      String,
    secret_hmac String,
    org_id      String,
    project_id  String,
    expires_at  DateTime,
    grace_until DateTime,
    actor       String,
    reason      String,
    at          DateTime,
    seq         UInt64
)
ENGINE = MergeTree()
ORDER BY (public_key, at, seq);
