-- `GET /v1/usage`, additive meters: exact totals per (org, project or '', meter, window start) in [from, to).
-- ${project} is `project_id` or `''`; ${window} a UInt32 bucket start (UTC) computed from `hour`, or 0.
-- Sums are split into high and low 32-bit halves (each exact for up to 2^32 rows), joined as a
-- 128-bit integer in src/api/usage.rs: a total beyond 64 bits is refused by name, never wrapped.
-- Reads the aggregate table under the public view `usage_hourly` directly: summing its rows is
-- what the view does, without a second GROUP BY per hour.
SELECT org_id, ${project} AS project, meter, ${window} AS window_start,
       sum(intDiv(value, 4294967296)) AS value_hi, sum(value % 4294967296) AS value_lo
FROM ${database}.usage_hourly_agg
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${filters}
GROUP BY org_id, project, meter, window_start
ORDER BY org_id, project, meter, window_start
