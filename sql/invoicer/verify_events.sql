-- Verification, side 2: the same figures recomputed from the per-event rows (FINAL: one row per
-- distinct event even before background merges).
-- Sums are split into high and low 32-bit halves (each exact for up to 2^32 rows) and joined in the
-- invoicer as a 128-bit integer: a total beyond 64 bits is refused by name, never wrapped (PRODUCT.md §1).
SELECT org_id, project_id, meter, toUInt32(hour) AS h, sum(intDiv(v, 4294967296)) AS value_hi, sum(v % 4294967296) AS value_lo
FROM ${database}.events FINAL
ARRAY JOIN meters AS meter, meter_values AS v
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
UNION ALL
SELECT org_id, project_id, meter, toUInt32(hour) AS h, toUInt64(0) AS value_hi, toUInt64(uniqCombined(u)) AS value_lo
FROM ${database}.events FINAL
ARRAY JOIN unique_meters AS meter, unique_hashes AS u
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, meter, h
