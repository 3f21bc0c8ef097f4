//! The Stripe emulator against Stripe's spec and rules, and the invoicer's Stripe client against
//! the emulator's faults. No other service needed.

use serde_json::{json, Value};
use tally::invoice::config::StripeConfig;
use tally::invoice::stripe::{meters, StripeError, StripeHttp};
use tally::stripe_emu::{Emulator, Faults};

const KEY: &str = "sk_test_emulator_shape";

fn emulator() -> Emulator {
    Emulator::start("127.0.0.1:0", KEY, 7).unwrap()
}

/// Raw request: (status, headers of interest, body).
fn call(emu: &Emulator, method: &str, path: &str, form: &str, idem: Option<&str>) -> (u16, Option<String>, Value) {
    let url = format!("{}{}", emu.base_url(), path.trim_start_matches('/'));
    let mut req = ureq::request(method, &url).set("Authorization", &format!("Bearer {KEY}"));
    if let Some(k) = idem {
        req = req.set("Idempotency-Key", k);
    }
    let res = if method == "POST" {
        req.set("Content-Type", "application/x-www-form-urlencoded").send_string(form)
    } else {
        req.call()
    };
    let r = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = r.status();
    let replayed = r.header("Idempotent-Replayed").map(str::to_string);
    (status, replayed, serde_json::from_str(&r.into_string().unwrap()).unwrap())
}

fn now() -> i64 {
    tally::invoice::reconcile::now_secs()
}

/// A minimal JSON-schema check for Stripe's OpenAPI: types, nullable, enums, required, $ref,
/// anyOf, items, additionalProperties; and no property the schema does not declare.
fn check(spec: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        if let Some(s) = spec["components"]["schemas"].get(name) {
            check(spec, s, v, at, errors);
        }
        return;
    }
    if v.is_null() {
        if schema.get("nullable") != Some(&json!(true)) && schema.get("anyOf").is_none() {
            errors.push(format!("{at}: null but not nullable"));
        }
        return;
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        let ok = any.iter().any(|s| {
            let mut e = Vec::new();
            check(spec, s, v, at, &mut e);
            e.is_empty()
        });
        if !ok {
            errors.push(format!("{at}: matches no anyOf branch: {v}"));
        }
        return;
    }
    if let Some(en) = schema.get("enum").and_then(Value::as_array) {
        if !en.contains(v) {
            errors.push(format!("{at}: {v} not in {en:?}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let type_ok = match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!("{at}: expected {ty}, got {v}"));
        return;
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(spec, items, x, &format!("{at}[{i}]"), errors);
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{at}: missing required {r}"));
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(spec, s, x, &format!("{at}.{k}"), errors),
                None => match schema.get("additionalProperties") {
                    Some(s) if s.is_object() => check(spec, s, x, &format!("{at}.{k}"), errors),
                    _ if props.is_some() => errors.push(format!("{at}: property {k} is not in Stripe's schema")),
                    _ => {}
                },
            }
        }
    }
}

fn assert_shape(spec: &Value, path: &str, method: &str, v: &Value) {
    let schema = &spec["paths"][path][method];
    assert!(!schema.is_null(), "no schema for {method} {path}");
    let mut errors = Vec::new();
    check(spec, schema, v, &format!("{method} {path}"), &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

fn assert_error_shape(spec: &Value, v: &Value) {
    let mut errors = Vec::new();
    check(spec, &json!({"$ref": "#/components/schemas/error"}), v, "error", &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn responses_match_stripes_schemas() {
    let spec: Value = serde_json::from_str(include_str!("fixtures/stripe-schemas.json")).unwrap();
    let emu = emulator();
    let (s, _, cus) = call(&emu, "POST", "/v1/customers", "name=Acme&metadata[tally_org_id]=org-1", Some("c1"));
    assert_eq!(s, 200, "{cus}");
    assert_shape(&spec, "/v1/customers", "post", &cus);
    let cid = cus["id"].as_str().unwrap().to_string();
    let (_, _, v) = call(&emu, "GET", &format!("/v1/customers/{cid}"), "", None);
    assert_shape(&spec, "/v1/customers/{customer}", "get", &v);
    let (_, _, v) = call(&emu, "GET", "/v1/customers?limit=10", "", None);
    assert_shape(&spec, "/v1/customers", "get", &v);
    let (_, _, v) =
        call(&emu, "GET", "/v1/customers/search?query=metadata%5B%27tally_org_id%27%5D%3A%27org-1%27", "", None);
    assert_shape(&spec, "/v1/customers/search", "get", &v);
    assert_eq!(v["data"][0]["id"], cid.as_str(), "search by metadata finds the customer");

    let (s, _, meter) = call(
        &emu,
        "POST",
        "/v1/billing/meters",
        "display_name=API&event_name=api_calls&default_aggregation[formula]=sum&customer_mapping[event_payload_key]=stripe_customer_id&customer_mapping[type]=by_id&value_settings[event_payload_key]=value",
        Some("m1"),
    );
    assert_eq!(s, 200, "{meter}");
    assert_shape(&spec, "/v1/billing/meters", "post", &meter);
    let mid = meter["id"].as_str().unwrap().to_string();
    let (_, _, v) = call(&emu, "GET", &format!("/v1/billing/meters/{mid}"), "", None);
    assert_shape(&spec, "/v1/billing/meters/{id}", "get", &v);
    let (_, _, v) = call(&emu, "GET", "/v1/billing/meters", "", None);
    assert_shape(&spec, "/v1/billing/meters", "get", &v);

    let t = now() - 7200;
    let (s, _, ev) = call(
        &emu,
        "POST",
        "/v1/billing/meter_events",
        &format!("event_name=api_calls&payload[stripe_customer_id]={cid}&payload[value]=5&identifier=e1&timestamp={t}"),
        Some("e1"),
    );
    assert_eq!(s, 200, "{ev}");
    assert_shape(&spec, "/v1/billing/meter_events", "post", &ev);
    // The check can fail: a missing required field and an undeclared one are both caught.
    let mut broken = ev.clone();
    broken.as_object_mut().unwrap().remove("created");
    broken["extra"] = json!(1);
    let mut errors = Vec::new();
    check(&spec, &spec["paths"]["/v1/billing/meter_events"]["post"], &broken, "broken", &mut errors);
    assert_eq!(errors.len(), 2, "{errors:?}");
    let (s, _, adj) = call(
        &emu,
        "POST",
        "/v1/billing/meter_event_adjustments",
        "event_name=api_calls&type=cancel&cancel[identifier]=e1",
        Some("a1"),
    );
    assert_eq!(s, 200, "{adj}");
    assert_shape(&spec, "/v1/billing/meter_event_adjustments", "post", &adj);
    let start = t - t.rem_euclid(3600);
    let (s, _, sums) = call(
        &emu,
        "GET",
        &format!("/v1/billing/meters/{mid}/event_summaries?customer={cid}&start_time={start}&end_time={}&value_grouping_window=hour", start + 7200),
        "",
        None,
    );
    assert_eq!(s, 200, "{sums}");
    assert_shape(&spec, "/v1/billing/meters/{id}/event_summaries", "get", &sums);

    let (s, _, sub) =
        call(&emu, "POST", "/v1/subscriptions", &format!("customer={cid}&items[0][price]=price_x"), Some("s1"));
    assert_eq!(s, 200, "{sub}");
    let si = sub["items"]["data"][0]["id"].as_str().unwrap().to_string();
    let (s, _, ur) = call(
        &emu,
        "POST",
        &format!("/v1/subscription_items/{si}/usage_records"),
        &format!("quantity=3&timestamp={}&action=increment", now()),
        Some("u1"),
    );
    assert_eq!(s, 200, "{ur}");
    assert_shape(&spec, "/v1/subscription_items/{subscription_item}/usage_records", "post", &ur);
    let (_, _, urs) = call(&emu, "GET", &format!("/v1/subscription_items/{si}/usage_record_summaries"), "", None);
    assert_shape(&spec, "/v1/subscription_items/{subscription_item}/usage_record_summaries", "get", &urs);
    assert_eq!(urs["data"][0]["total_usage"], 3);
    // The invoicer reads the current billing period from the subscription (legacy API versions
    // keep it there): both objects as Stripe's schemas define them.
    let sid = sub["id"].as_str().unwrap().to_string();
    for (path, schema) in [
        (format!("/v1/subscriptions/{sid}"), "subscription"),
        (format!("/v1/subscription_items/{si}"), "subscription_item"),
    ] {
        let (s, _, v) = call(&emu, "GET", &path, "", None);
        assert_eq!(s, 200, "{v}");
        let mut errors = Vec::new();
        check(&spec, &json!({"$ref": format!("#/components/schemas/{schema}")}), &v, &path, &mut errors);
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    // Meters mode reads which periods invoices closed: a metered price naming the meter, a
    // subscription on it, and its invoices, as Stripe's schemas define them.
    let (s, _, price) = call(
        &emu,
        "POST",
        "/v1/prices",
        &format!("currency=usd&unit_amount=1&recurring[interval]=month&recurring[usage_type]=metered&recurring[meter]={mid}&product_data[name]=API"),
        Some("p1"),
    );
    assert_eq!(s, 200, "{price}");
    let mut errors = Vec::new();
    check(&spec, &json!({"$ref": "#/components/schemas/price"}), &price, "price", &mut errors);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let backdated = now() - tally::stripe_emu::state::PERIOD_SECS - 7200;
    let (s, _, msub) = call(
        &emu,
        "POST",
        "/v1/subscriptions",
        &format!("customer={cid}&backdate_start_date={backdated}&items[0][price]={}", price["id"].as_str().unwrap()),
        Some("s2"),
    );
    assert_eq!(s, 200, "{msub}");
    assert_eq!(msub["items"]["data"][0]["price"]["recurring"]["meter"], mid.as_str());
    let (s, _, invoices) =
        call(&emu, "GET", &format!("/v1/invoices?subscription={}", msub["id"].as_str().unwrap()), "", None);
    assert_eq!(s, 200, "{invoices}");
    assert_shape(&spec, "/v1/invoices", "get", &invoices);
    let reasons: Vec<&Value> = invoices["data"].as_array().unwrap().iter().map(|i| &i["billing_reason"]).collect();
    // Newest first: the backdated subscription was created after its first period ended.
    assert_eq!(reasons, [&json!("subscription_create"), &json!("subscription_cycle")], "{invoices}");

    let (s, _, err) = call(&emu, "GET", "/v1/billing/meters/mtr_nope", "", None);
    assert_eq!(s, 404);
    assert_error_shape(&spec, &err);
}

/// Meters mode: a subscription's cycle invoice is a draft for an hour after its period ends, then
/// finalized; `invoices::finalized` gives, per Stripe meter a subscription bills, the periods
/// whose cycle invoices are final (with Stripe's finalization time) or about to be (within the
/// margin, no time yet) — nothing while only the create invoice exists, nothing for a meter no
/// subscription bills or a customer without subscriptions.
#[test]
fn finalized_invoices_close_periods_per_meter() {
    use tally::invoice::stripe::invoices::{finalized, Closed, FinalPeriod, FINALIZE_MARGIN_SECS};
    use tally::stripe_emu::state::{FINALIZE_AFTER_SECS, PERIOD_SECS};
    let emu = emulator();
    let (cid, m) = customer_and_meter(&emu);
    let mid = m["id"].as_str().unwrap().to_string();
    let (_, _, other) = call(
        &emu,
        "POST",
        "/v1/billing/meters",
        "display_name=y&event_name=ev2&default_aggregation[formula]=sum",
        Some("m2"),
    );
    let (_, _, lonely) = call(&emu, "POST", "/v1/customers", "name=B", Some("c2"));
    let (_, _, price) = call(
        &emu,
        "POST",
        "/v1/prices",
        &format!("currency=usd&recurring[interval]=month&recurring[usage_type]=metered&recurring[meter]={mid}"),
        Some("p"),
    );
    // A metered price needs a meter that exists, and usage_type=metered.
    let (s, _, _) = call(
        &emu,
        "POST",
        "/v1/prices",
        "currency=usd&recurring[meter]=mtr_nope&recurring[usage_type]=metered",
        Some("p2"),
    );
    assert_eq!(s, 404);
    let (s, _, _) = call(&emu, "POST", "/v1/prices", &format!("currency=usd&recurring[meter]={mid}"), Some("p3"));
    assert_eq!(s, 400);
    // The period ends 10 minutes from now.
    let t0 = now();
    let start = t0 + 600 - PERIOD_SECS;
    let (s, _, sub) = call(
        &emu,
        "POST",
        "/v1/subscriptions",
        &format!(
            "customer={cid}&backdate_start_date={start}&items[0][price]={}&items[1][price]=price_legacy",
            price["id"].as_str().unwrap()
        ),
        Some("s"),
    );
    assert_eq!(s, 200, "{sub}");
    let c = client(&emu, KEY);
    let advance = |secs: i64| {
        ureq::post(&format!("{}_emulator/clock", emu.base_url())).send_string(&format!("advance_secs={secs}")).unwrap();
    };
    let want = |start: i64, end: i64, finalized_at: Option<i64>| {
        let closed = Closed { until: end, periods: vec![FinalPeriod { start, end, finalized_at }] };
        [(mid.clone(), closed)].into_iter().collect::<std::collections::BTreeMap<_, _>>()
    };
    let finalized_until = |c: &tally::invoice::stripe::client::StripeHttp, cid: &str, now: i64| {
        finalized(c, cid, now, FINALIZE_MARGIN_SECS)
    };
    let statuses = || {
        let (_, _, list) = call(&emu, "GET", &format!("/v1/invoices?customer={cid}"), "", None);
        list["data"].as_array().unwrap().iter().map(|i| i["status"].clone()).collect::<Vec<_>>()
    };
    assert!(finalized_until(&c, &cid, t0).unwrap().is_empty(), "the create invoice closes nothing");
    assert_eq!(statuses(), [json!("open")]);
    advance(1200);
    assert_eq!(statuses(), [json!("draft"), json!("open")], "the period ended: its invoice is a draft");
    let end = start + PERIOD_SECS;
    assert!(finalized_until(&c, &cid, t0).unwrap().is_empty(), "a draft an hour from its finalization");
    let near = end + FINALIZE_AFTER_SECS - FINALIZE_MARGIN_SECS;
    assert_eq!(
        finalized_until(&c, &cid, near).unwrap(),
        want(start, end, None),
        "a draft within the margin counts as final"
    );
    // The margin is the caller's (the period ends 600 s after t0).
    assert_eq!(finalized(&c, &cid, t0, FINALIZE_AFTER_SECS + 600).unwrap(), want(start, end, None));
    assert!(finalized(&c, &cid, t0, FINALIZE_AFTER_SECS + 599).unwrap().is_empty());
    assert!(finalized_until(&c, &cid, near - 1).unwrap().is_empty());
    advance(FINALIZE_AFTER_SECS);
    assert_eq!(statuses(), [json!("open"), json!("open")], "finalized an hour after the period's end");
    let closed = finalized_until(&c, &cid, t0).unwrap();
    assert_eq!(closed, want(start, end, Some(end + FINALIZE_AFTER_SECS)), "with Stripe's finalization time");
    assert!(!closed.contains_key(other["id"].as_str().unwrap()), "no subscription bills the other meter");
    assert!(finalized_until(&c, lonely["id"].as_str().unwrap(), t0).unwrap().is_empty());
}

/// A customer and a `sum` meter with event name `ev`: (customer id, meter object).
fn customer_and_meter(emu: &Emulator) -> (String, Value) {
    let (_, _, cus) = call(emu, "POST", "/v1/customers", "name=A", Some("c"));
    let (_, _, m) = call(
        emu,
        "POST",
        "/v1/billing/meters",
        "display_name=x&event_name=ev&default_aggregation[formula]=sum",
        Some("m"),
    );
    (cus["id"].as_str().unwrap().to_string(), m)
}

#[test]
fn stripes_rules_hold() {
    let emu = emulator();
    let (cid, m) = customer_and_meter(&emu);
    let mid = m["id"].as_str().unwrap().to_string();
    let ev = |id: &str, ts: i64, v: u64| {
        format!("event_name=ev&payload[stripe_customer_id]={cid}&payload[value]={v}&identifier={id}&timestamp={ts}")
    };

    // Idempotency: same key + same body → the stored answer, replayed; same key + other body → 400.
    let first = ev("i1", now(), 1);
    let (s1, r1, a) = call(&emu, "POST", "/v1/billing/meter_events", &first, Some("k1"));
    let (s2, r2, b) = call(&emu, "POST", "/v1/billing/meter_events", &first, Some("k1"));
    assert_eq!((s1, r1, s2, r2.as_deref()), (200, None, 200, Some("true")));
    assert_eq!(a, b);
    // Stripe compares parameters, not bytes: the same form in another order is the same request.
    let mut parts: Vec<&str> = first.split('&').collect();
    parts.reverse();
    let (s3, r3, c) = call(&emu, "POST", "/v1/billing/meter_events", &parts.join("&"), Some("k1"));
    assert_eq!((s3, r3.as_deref(), &c), (200, Some("true"), &a));
    let (s, _, e) = call(&emu, "POST", "/v1/billing/meter_events", &ev("i2", now(), 1), Some("k1"));
    assert_eq!((s, e["error"]["type"].as_str()), (400, Some("idempotency_error")));
    // Identifier uniqueness under a different key, answered as real Stripe answers it: no code,
    // "An event already exists with identifier …" (langfuse/langfuse#16292).
    let (s, _, e) = call(&emu, "POST", "/v1/billing/meter_events", &ev("i1", now(), 1), Some("k2"));
    assert_eq!(
        (s, e["error"]["type"].as_str(), e["error"]["code"].as_str()),
        (400, Some("invalid_request_error"), None)
    );
    assert!(e["error"]["message"].as_str().unwrap().contains("already exists with identifier i1"), "{e}");
    // 35 days back, 5 minutes ahead.
    let (s, _, e) = call(&emu, "POST", "/v1/billing/meter_events", &ev("old", now() - 36 * 86_400, 1), Some("k3"));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("timestamp")));
    let (s, _, _) = call(&emu, "POST", "/v1/billing/meter_events", &ev("ahead", now() + 600, 1), Some("k4"));
    assert_eq!(s, 400);
    // Summaries need minute-aligned times.
    let (s, _, _) = call(
        &emu,
        "GET",
        &format!("/v1/billing/meters/{mid}/event_summaries?customer={cid}&start_time=61&end_time=3600"),
        "",
        None,
    );
    assert_eq!(s, 400);
    // Cancels only within 24 h of the event's creation.
    call(&emu, "POST", "/v1/billing/meter_events", &ev("late", now() - 3600, 1), Some("k5"));
    ureq::post(&format!("{}_emulator/clock", emu.base_url())).send_string("advance_secs=90000").unwrap();
    let (s, _, e) = call(
        &emu,
        "POST",
        "/v1/billing/meter_event_adjustments",
        "event_name=ev&type=cancel&cancel[identifier]=late",
        Some("k6"),
    );
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("meter_event_cancel_window_passed")));
    // Auth.
    let r = ureq::get(&format!("{}v1/customers", emu.base_url())).set("Authorization", "Bearer sk_test_wrong").call();
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));
}

fn client(emu: &Emulator, key: &str) -> StripeHttp {
    client_with(emu, key, 12)
}

fn client_with(emu: &Emulator, key: &str, max_attempts: u32) -> StripeHttp {
    let cfg: StripeConfig = toml::from_str(&format!(
        "api_base = \"{}\"\napi_key = \"{key}\"\nmax_requests_per_sec = 5000\nmax_attempts = {max_attempts}\ninitial_backoff_ms = 1\nmax_backoff_ms = 20\n",
        emu.base_url()
    ))
    .unwrap();
    StripeHttp::new(&cfg, true)
}

/// A meter event whose first answer was a 500 that Stripe keeps under its Idempotency-Key lands
/// once, through a new key, even with `max_attempts = 1` (each run starts with the push's own
/// key, which holds that 500 for 24 hours; found by a review: with one attempt it never landed).
#[test]
fn a_stored_500_is_got_past_with_a_new_key() {
    let emu = emulator();
    let c = client_with(&emu, KEY, 1);
    let (cid, m) = customer_and_meter(&emu);
    let info = meters::retrieve_meter(&c, m["id"].as_str().unwrap()).unwrap();
    let t = now() - 60;
    for i in 0..20u64 {
        let id = format!("stored-{i}");
        emu.set_faults(Faults { rate_500_stored: 1.0, ..Faults::default() });
        // One attempt: a fresh 500 (stored under the key) is not retried.
        let first = meters::create_meter_event(&c, &info, &cid, 7, t, &id).unwrap_err();
        assert_eq!(first.status(), Some(500), "{first}");
        emu.set_faults(Faults::default());
        // The next run: its first attempt meets the stored 500, the renewed key lands the event
        // (or meets the identifier that a write before the 500 took).
        match meters::create_meter_event(&c, &info, &cid, 7, t, &id) {
            Ok(()) => {}
            Err(e) => assert!(e.is_duplicate_identifier(), "{e}"),
        }
    }
    let url = format!("{}_emulator/meter_events", emu.base_url());
    let v: Value = serde_json::from_str(&ureq::get(&url).call().unwrap().into_string().unwrap()).unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|e| e["identifier"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 20, "each event once: {ids:?}");
    assert_eq!(ids.iter().collect::<std::collections::BTreeSet<_>>().len(), 20);
    assert_eq!(emu.stats().stored_500, 20, "{:?}", emu.stats());
    assert!(emu.stats().idempotent_replays >= 20, "each second run met its stored 500: {:?}", emu.stats());
}

/// Under 429s, 500s and answers lost after the write, every push lands exactly once: retries
/// carry the same Idempotency-Key and Stripe replays the stored answer.
#[test]
fn client_retries_land_each_push_once() {
    let emu = emulator();
    let c = client(&emu, KEY);
    let (cid, m) = customer_and_meter(&emu);
    let info = meters::retrieve_meter(&c, m["id"].as_str().unwrap()).unwrap();
    emu.set_faults(Faults { rate_429: 0.15, rate_500: 0.15, rate_drop_after_write: 0.15, ..Faults::default() });
    let t = now() - 60;
    for i in 0..200u64 {
        meters::create_meter_event(&c, &info, &cid, i, t, &format!("push-{i}")).unwrap();
    }
    emu.set_faults(Faults::default());
    let stats = emu.stats();
    assert!(stats.injected_429 > 0 && stats.injected_500 > 0 && stats.injected_drops > 0, "{stats:?}");
    assert!(stats.idempotent_replays > 0, "lost answers were replayed: {stats:?}");
    assert_eq!(stats.meter_events_created, 200, "{stats:?}");
    let start = t - t.rem_euclid(3600);
    let s = meters::summaries(&c, &info.id, &cid, start, start + 3600, Some("hour")).unwrap();
    assert_eq!(s, vec![(start, (0..200).sum::<u64>() as f64)]);
}

#[test]
fn client_refuses_unsafe_posts_and_hides_the_key() {
    let emu = emulator();
    let c = client(&emu, KEY);
    let e = c.send(stripe_client_core::StripeMethod::Post, "/customers", None, Some("name=x"), None).unwrap_err();
    assert!(matches!(e, StripeError::Client(_)), "{e}");
    let bad = client(&emu, "sk_test_secret_value_123");
    let e = meters::list_meters(&bad).unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(!format!("{e} {e:?} {bad:?}").contains("sk_test_secret_value_123"), "{e}");
}

/// `Stripe-Should-Retry: false` stops retries even on a 5xx; `true` retries even a 4xx.
#[test]
fn client_honours_stripe_should_retry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tally::httpd::Reply;
    for (status, should_retry, want_requests) in [(500, "false", 1), (400, "true", 3)] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = hits.clone();
        let s = stop.clone();
        std::thread::spawn(move || {
            tally::httpd::serve(
                listener,
                s,
                Arc::new(move |_| {
                    h.fetch_add(1, Ordering::SeqCst);
                    Reply::json(status, &json!({"error": {"type": "api_error", "message": "no"}}))
                        .with_header("Stripe-Should-Retry", should_retry)
                }),
            )
        });
        let cfg: StripeConfig = toml::from_str(&format!(
            "api_base = \"http://{addr}/\"\napi_key = \"{KEY}\"\nmax_attempts = 3\ninitial_backoff_ms = 1\nmax_backoff_ms = 2\n"
        ))
        .unwrap();
        let e = meters::list_meters(&StripeHttp::new(&cfg, true)).unwrap_err();
        assert_eq!(e.status(), Some(status));
        assert_eq!(hits.load(Ordering::SeqCst), want_requests, "status {status}, Stripe-Should-Retry: {should_retry}");
        stop.store(true, Ordering::SeqCst);
    }
}
