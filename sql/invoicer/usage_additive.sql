-- `tally-invoicer usage`: additive totals per (org, project, meter) in [from, to).
-- Sums are split into high and low 32-bit halves (each exact for up to 2^32 rows) and joined in the
-- invoicer as a 128-bit integer: a total beyond 64 bits is refused by name, never wrapped (PRODUCT.md §1).
SELECT org_id, project_id, meter, sum(intDiv(value, 4294967296)) AS value_hi, sum(value % 4294967296) AS value_lo
FROM ${database}.usage_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${org_filter}
GROUP BY org_id, project_id, meter
ORDER BY org_id, project_id, meter
