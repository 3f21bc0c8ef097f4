-- Figures (org, project, meter, hour) whose exact total, from the per-event rows, needs more than
-- 64 bits. `sum` would wrap (in the materialized view too), so the values are summed as 32-bit
-- halves: total = (hi + lo / 2^32) * 2^32 + lo mod 2^32 overflows iff hi + intDiv(lo, 2^32) >= 2^32.
-- All of them, not the first few: each refuses its own figure, and only its own.
SELECT org_id, project_id, meter, toUInt32(hour) AS h, sum(intDiv(v, 4294967296)) AS value_hi, sum(v % 4294967296) AS value_lo
FROM ${database}.events FINAL
ARRAY JOIN meters AS meter, meter_values AS v
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to}) ${org_filter}
GROUP BY org_id, project_id, meter, h
HAVING value_hi + intDiv(value_lo, 4294967296) >= 4294967296
ORDER BY org_id, project_id, meter, h
