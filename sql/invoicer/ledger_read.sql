-- The ledger rows of one Stripe mode whose bucket overlaps [from, to).
SELECT push_id, state, action, org_id, customer, meter, target, event_name,
       toUInt32(bucket_start), toUInt32(bucket_end), seq, value, cancels, toUInt32(event_ts),
       toUInt32(recorded_at), detail, run_id
FROM ${database}.stripe_ledger
WHERE mode = ${mode} AND account = ${account}
  AND bucket_start < toDateTime(${to}) AND bucket_end > toDateTime(${from})
ORDER BY customer, meter, bucket_start, seq, push_id
