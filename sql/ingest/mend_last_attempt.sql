-- The rows a mend reads (a WHERE condition on `events`): those of one source partition at offsets
-- [${from_offset}, ${to_offset}), event time at or after the dedupe horizon, written by the
-- partition's last INSERT attempt. An attempt's rows share one `ingested_at` (the batch's, kept
-- by its retries), and only the partition's last attempt can be unanswered: a worker sends no
-- batch before the previous one answered, and offsets only grow (docs/exactly-once.md, "The
-- aggregates"). So the rows are those sharing the `ingested_at` of the row with the highest
-- offset (other batches of the same second are read too, which is harmless).
src_topic = ${topic} AND src_partition = ${partition} AND src_offset >= ${from_offset}
  AND src_offset < ${to_offset} AND hour >= toDateTime(${horizon_hour})
  AND ingested_at = (
      SELECT argMax(ingested_at, src_offset) FROM ${database}.events
      WHERE src_topic = ${topic} AND src_partition = ${partition} AND src_offset >= ${from_offset}
        AND src_offset < ${to_offset} AND hour >= toDateTime(${horizon_hour}))
