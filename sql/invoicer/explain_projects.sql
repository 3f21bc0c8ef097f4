-- `explain`: one additive meter's usage per (org, project, bucket) in [from, to), for the orgs of
-- one Stripe customer. Split sums as everywhere (joined exactly in src/invoice/sql.rs).
SELECT org_id, project_id, intDiv(toUInt32(hour), ${bucket_secs}) * ${bucket_secs} AS bucket,
       sum(intDiv(value, 4294967296)) AS value_hi, sum(value % 4294967296) AS value_lo
FROM ${database}.usage_hourly
WHERE meter = ${meter} AND org_id IN (${orgs})
  AND hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, project_id, bucket
ORDER BY org_id, bucket, project_id
