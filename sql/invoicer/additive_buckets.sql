-- tally's additive totals per (org, meter, bucket) in [from, to), from the public view.
SELECT org_id, meter, intDiv(toUInt32(hour), ${bucket_secs}) * ${bucket_secs} AS bucket, sum(value) AS value
FROM ${database}.usage_hourly
WHERE hour >= toDateTime(${from}) AND hour < toDateTime(${to})
GROUP BY org_id, meter, bucket
ORDER BY org_id, meter, bucket
