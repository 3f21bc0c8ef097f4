-- Verification, side 1a: what the additive aggregates say per (org, project, meter, hour), as exact
-- sums. Read first (before side 1b and the events); these figures are also what reconcile bills.
-- Sums are split into high and low 32-bit halves (each exact for up to 2^32 rows) and joined in the
-- invoicer as a 128-bit integer: a total beyond 64 bits is refused by name, never wrapped (PRODUCT.md §1).
SELECT org_id, project_id, meter, toUInt32(hour) AS h, sum(intDiv(value, 4294967296)) AS value_hi, sum(value % 4294967296) AS value_lo
FROM ${database}.usage_hourly_agg
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
