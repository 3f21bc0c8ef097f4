#!/usr/bin/env python3
"""Signs JWTs with PyJWT (an independent implementation) for the identity tests.

Reads a JSON request on stdin:
  {"keys": [{"kid": "rsa-1", "kty": "RSA"|"EC"|"OKP"|"oct"}, ...],
   "tokens": [{"name": "ok-rsa", "kid": "rsa-1", "alg": "RS256", "claims": {...}}, ...]}
and writes {"jwks": {"keys": [public JWKs]}, "tokens": {"name": "compact JWS", ...}} on stdout.
A token may sign with another key than its header's kid (`"sign_with": "ec-1"`) or be an
algorithm-confusion forgery (`"forge": "hs256-public-pem"`: HS256 keyed with the RSA key's public
PEM, the classic attack; `"forge": "none"`: alg none)."""
import base64, hashlib, hmac, json, sys

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def main():
    req = json.load(sys.stdin)
    private, public_jwks = {}, []
    for k in req["keys"]:
        kid, kty = k["kid"], k["kty"]
        if kty == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        elif kty == "EC":
            key = ec.generate_private_key(ec.SECP256R1())
            jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        elif kty == "OKP":
            key = ed25519.Ed25519PrivateKey.generate()
            jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
        elif kty == "oct":
            key = hashlib.sha256(kid.encode()).digest() * 2
            jwk = {"kty": "oct", "k": b64(key)}
        else:
            raise SystemExit(f"unknown kty {kty}")
        jwk["kid"] = kid
        if k.get("alg"):
            jwk["alg"] = k["alg"]
        if k.get("use"):
            jwk["use"] = k["use"]
        private[kid] = key
        if kty != "oct" or k.get("publish"):
            public_jwks.append(jwk)
    tokens = {}
    for t in req["tokens"]:
        headers = {"kid": t["kid"]}
        forge = t.get("forge")
        if forge == "hs256-public-pem":
            pem = private[t["kid"]].public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": t["kid"]}).encode())
            body = b64(json.dumps(t["claims"]).encode())
            sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
            tokens[t["name"]] = f"{head}.{body}.{b64(sig)}"
        elif forge == "none":
            head = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": t["kid"]}).encode())
            tokens[t["name"]] = f"{head}.{b64(json.dumps(t['claims']).encode())}."
        else:
            key = private[t.get("sign_with", t["kid"])]
            tokens[t["name"]] = jwt.encode(t["claims"], key, algorithm=t["alg"], headers=headers)
    json.dump({"jwks": {"keys": public_jwks}, "tokens": tokens}, sys.stdout)


if __name__ == "__main__":
    main()
