#!/usr/bin/env python3
"""Extracts from ../shared/stripe/*.openapi.json the response schemas of the endpoints the
emulator serves (and the error schema), with the schemas they reference, into
tests/fixtures/stripe-schemas.json. The emulator's shape test validates its answers against it.
`customer` references most of Stripe (expandable fields): it is kept one level deep, and the
validator treats a reference it does not hold as "anything".
Usage: scripts/extract-stripe-schemas.py [SPEC_DIR]"""
import json, os, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "..", "shared", "stripe")
ENDPOINTS = {
    "stripe-billing-meters.openapi.json": [
        ("post", "/v1/billing/meter_events"), ("post", "/v1/billing/meter_event_adjustments"),
        ("get", "/v1/billing/meters"), ("post", "/v1/billing/meters"), ("get", "/v1/billing/meters/{id}"),
        ("get", "/v1/billing/meters/{id}/event_summaries"), ("get", "/v1/customers"), ("post", "/v1/customers"),
        ("get", "/v1/customers/{customer}"), ("get", "/v1/customers/search"), ("get", "/v1/invoices"),
    ],
    "stripe-legacy-usage-records.openapi.json": [
        ("post", "/v1/subscription_items/{subscription_item}/usage_records"),
        ("get", "/v1/subscription_items/{subscription_item}/usage_record_summaries"),
    ],
}
# Objects the emulator serves on endpoints outside the spec subsets (GET subscriptions and
# subscription items, which the invoicer reads for the current billing period in legacy mode;
# POST prices, whose metered prices name a meter): validated against their component schemas.
OBJECTS = {
    "stripe-billing-meters.openapi.json": ["price"],
    "stripe-legacy-usage-records.openapi.json": ["subscription", "subscription_item"],
}
out = {"paths": {}, "components": {"schemas": {}}}
for fname, eps in ENDPOINTS.items():
    spec = json.load(open(os.path.join(spec_dir, fname)))
    schemas = spec["components"]["schemas"]
    todo = ["error"] + [{"$ref": f"#/components/schemas/{o}"} for o in OBJECTS.get(fname, [])]
    for method, path in eps:
        resp = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        out["paths"].setdefault(path, {})[method] = resp
        todo.append(resp)
    seen = out["components"]["schemas"]
    SHALLOW = {"customer", "price", "subscription_schedule", "invoice", "setup_intent", "payment_method", "account"}
    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref:
                name = ref.split("/")[-1]
                if name not in seen:
                    seen[name] = schemas[name]
                    if name not in SHALLOW:
                        walk(schemas[name])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for t in todo:
        walk(t)
path = os.path.join(root, "tests", "fixtures", "stripe-schemas.json")
with open(path, "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
print(f"{path}: {len(out['paths'])} paths, {len(out['components']['schemas'])} schemas")
