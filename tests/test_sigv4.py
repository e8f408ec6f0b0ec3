"""The SigV4 signer against AWS's published test vectors.

The first set is AWS's "Signature Version 4 test suite" (service "service",
us-east-1, 2015-08-30T12:36:00Z, the documented example key). Each case is the
suite's raw request (.req), the signature of its .authz and, where the suite
prints them, the canonical request (.creq) and string to sign (.sts). The
"normalize-path" cases are signed with path normalization, which the suite
applies to every service except S3.

The second set is the worked examples of the S3 API reference ("Signature
calculations for the Authorization header": GET Object, PUT Object, GET Bucket
lifecycle, GET Bucket), signed for service "s3" without normalization.
"""

from __future__ import annotations

import pytest

from appliance.subscribers import sigv4

SUITE_KEY = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_SCOPE = "20150830/us-east-1/service/aws4_request"
STS_TOKEN = (
    "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSP"
    "fIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7"
    "WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm"
    "8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="
)
HOST = "Host:example.amazonaws.com\n"
DATE = "X-Amz-Date:20150830T123600Z"
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
FORM_HASH = "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"

# name: (.req text, signed headers, signature, .creq or None, hash line of .sts or None)
SUITE = {
    "get-vanilla": (
        f"GET / HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        None,
        None,
    ),
    "get-vanilla-query-order-key-case": (
        f"GET /?Param2=value2&Param1=value1 HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        None,
        None,
    ),
    "get-vanilla-query-order-key": (
        f"GET /?Param1=value2&Param1=Value1 HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "eedbc4e291e521cf13422ffca22be7d2eb8146eecf653089df300a15b2382bd1",
        "GET\n/\nParam1=Value1&Param1=value2\nhost:example.amazonaws.com\n"
        f"x-amz-date:20150830T123600Z\n\nhost;x-amz-date\n{EMPTY}",
        "704b4cef673542d84cdff252633f065e8daeba5f168b77116f8b1bcaf3d38f89",
    ),
    "get-vanilla-query-order-value": (
        f"GET /?Param1=value2&Param1=value1 HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
        "GET\n/\nParam1=value1&Param1=value2\nhost:example.amazonaws.com\n"
        f"x-amz-date:20150830T123600Z\n\nhost;x-amz-date\n{EMPTY}",
        "c968629d70850097a2d8781c9bf7edcb988b04cac14cca9be4acc3595f884606",
    ),
    "get-vanilla-empty-query-key": (
        f"GET /?Param1=value1 HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
        None,
        None,
    ),
    "get-vanilla-query-unreserved": (
        "GET /?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        "=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz HTTP/1.1\n"
        f"{HOST}{DATE}",
        "host;x-amz-date",
        "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
        None,
        None,
    ),
    "get-vanilla-utf8-query": (
        f"GET /?\u1234=bar HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
        None,
        None,
    ),
    "get-utf8": (
        f"GET /\u1234 HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
        None,
        None,
    ),
    "get-unreserved": (
        "GET /-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz HTTP/1.1\n"
        f"{HOST}{DATE}",
        "host;x-amz-date",
        "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
        None,
        None,
    ),
    "get-header-key-duplicate": (
        f"GET / HTTP/1.1\n{HOST}My-Header1:value2\nMy-Header1:value2\nMy-Header1:value1\n{DATE}",
        "host;my-header1;x-amz-date",
        "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
        None,
        None,
    ),
    "get-header-value-multiline": (
        f"GET / HTTP/1.1\n{HOST}My-Header1:value1\n  value2\n     value3\n{DATE}",
        "host;my-header1;x-amz-date",
        "ba17b383a53190154eb5fa66a1b836cc297cc0a3d70a5d00705980573d8ff790",
        "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1,value2,value3\n"
        f"x-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\n{EMPTY}",
        "b7b6cbfd8a0430b78891e986784da2630c8a135a8595cec25b26ea94f926ee55",
    ),
    "get-header-value-order": (
        f"GET / HTTP/1.1\n{HOST}My-Header1:value4\nMy-Header1:value1\nMy-Header1:value3\n"
        f"My-Header1:value2\n{DATE}",
        "host;my-header1;x-amz-date",
        "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
        None,
        None,
    ),
    "get-header-value-trim": (
        f'GET / HTTP/1.1\n{HOST}My-Header1: value1\nMy-Header2: "a   b   c"\n{DATE}',
        "host;my-header1;my-header2;x-amz-date",
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        None,
        None,
    ),
    "post-vanilla": (
        f"POST / HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        None,
        None,
    ),
    "post-vanilla-empty-query-value": (
        f"POST /?Param1=value1 HTTP/1.1\n{HOST}{DATE}",
        "host;x-amz-date",
        "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
        None,
        None,
    ),
    "post-header-key-sort": (
        f"POST / HTTP/1.1\n{HOST}My-Header1:value1\n{DATE}",
        "host;my-header1;x-amz-date",
        "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
        None,
        None,
    ),
    "post-header-value-case": (
        f"POST / HTTP/1.1\n{HOST}My-Header1:VALUE1\n{DATE}",
        "host;my-header1;x-amz-date",
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
        None,
        None,
    ),
    "post-x-www-form-urlencoded": (
        f"POST / HTTP/1.1\nContent-Type:application/x-www-form-urlencoded\n{HOST}{DATE}\n\n"
        "Param1=value1",
        "content-type;host;x-amz-date",
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        "POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\n"
        f"x-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n{FORM_HASH}",
        "42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
    ),
    "post-x-www-form-urlencoded-parameters": (
        "POST / HTTP/1.1\nContent-Type:application/x-www-form-urlencoded; charset=utf8\n"
        f"{HOST}{DATE}\n\nParam1=value1",
        "content-type;host;x-amz-date",
        "1a72ec8f64bd914b0e42e42607c7fbce7fb2c7465f63e3092b3b0d39fa77a6fe",
        "POST\n/\n\ncontent-type:application/x-www-form-urlencoded; charset=utf8\n"
        "host:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        f"content-type;host;x-amz-date\n{FORM_HASH}",
        "2e1cf7ed91881a30569e46552437e4156c823447bf1781b921b5d486c568dd1c",
    ),
    "post-sts-header-before": (
        f"POST / HTTP/1.1\n{HOST}{DATE}\nX-Amz-Security-Token:{STS_TOKEN}",
        "host;x-amz-date;x-amz-security-token",
        "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
        None,
        None,
    ),
}

NORMALIZE_PATH = {
    "get-space": (
        "/example space/",
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    ),
    "get-slashes": (
        "//example//",
        "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    ),
    "get-slash-dot-slash": (
        "/./",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    "get-slash-pointless-dot": (
        "/./example",
        "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
    ),
    "get-relative-relative": (
        "/example1/example2/../..",
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
}


def parse_req(text: str):
    """A suite .req file: request line, headers (folded lines continue the previous
    header and count as one more of its values), a blank line, the body."""
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, rest = lines[0].split(" ", 1)
    target, _version = rest.rsplit(" ", 1)
    path, _, query = target.partition("?")
    params = [tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            headers.append((headers[-1][0], line))
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return method, path, params, headers, body.encode()


@pytest.mark.parametrize("name", sorted(SUITE))
def test_suite_vector(name):
    req, signed_headers, signature, creq, sts_hash = SUITE[name]
    method, path, params, headers, body = parse_req(req)
    signed = sigv4.sign(
        method,
        path,
        params,
        headers,
        sigv4.payload_hash(body),
        SUITE_KEY,
        "us-east-1",
        "service",
        normalize=True,
    )
    if creq is not None:
        assert signed.canonical_request == creq
    if sts_hash is not None:
        assert (
            signed.string_to_sign
            == f"AWS4-HMAC-SHA256\n20150830T123600Z\n{SUITE_SCOPE}\n{sts_hash}"
        )
    assert signed.authorization == (
        f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{SUITE_SCOPE}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    assert signed.headers[-1] == ("Authorization", signed.authorization)


@pytest.mark.parametrize("name", sorted(NORMALIZE_PATH))
def test_suite_normalize_path_vector(name):
    path, signature = NORMALIZE_PATH[name]
    signed = sigv4.sign(
        "GET",
        path,
        [],
        [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")],
        EMPTY,
        SUITE_KEY,
        "us-east-1",
        "service",
        normalize=True,
    )
    assert signed.signature == signature


def test_session_token_is_added_and_signed():
    creds = sigv4.Credentials(SUITE_KEY.access_key, SUITE_KEY.secret_key, STS_TOKEN)
    signed = sigv4.sign(
        "POST",
        "/",
        [],
        [("Host", "example.amazonaws.com")],
        EMPTY,
        creds,
        "us-east-1",
        "service",
        "20150830T123600Z",
    )
    assert signed.signature == SUITE["post-sts-header-before"][2]
    assert ("X-Amz-Security-Token", STS_TOKEN) in signed.headers
    assert ("X-Amz-Date", "20150830T123600Z") in signed.headers
    assert STS_TOKEN not in repr(creds) and SUITE_KEY.secret_key not in repr(creds)


S3_KEY = sigv4.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_HOST = "examplebucket.s3.amazonaws.com"
S3_DATE = "20130524T000000Z"
WELCOME_HASH = "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"

# (method, decoded path, query, extra headers, payload hash, signature)
S3_EXAMPLES = {
    "get-object": (
        "GET",
        "/test.txt",
        [],
        [("Range", "bytes=0-9")],
        EMPTY,
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    "put-object": (
        "PUT",
        "/test$file.text",
        [],
        [("Date", "Fri, 24 May 2013 00:00:00 GMT"), ("x-amz-storage-class", "REDUCED_REDUNDANCY")],
        WELCOME_HASH,
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    "get-bucket-lifecycle": (
        "GET",
        "/",
        [("lifecycle", "")],
        [],
        EMPTY,
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    ),
    "list-objects": (
        "GET",
        "/",
        [("prefix", "J"), ("max-keys", "2")],
        [],
        EMPTY,
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
}


@pytest.mark.parametrize("name", sorted(S3_EXAMPLES))
def test_s3_documentation_example(name):
    method, path, params, extra, body_hash, signature = S3_EXAMPLES[name]
    headers = [("Host", S3_HOST), *extra, ("x-amz-content-sha256", body_hash)]
    signed = sigv4.sign(
        method, path, params, headers, body_hash, S3_KEY, "us-east-1", "s3", S3_DATE
    )
    assert signed.signature == signature
    assert signed.authorization.startswith(
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
    )


def test_put_object_example_payload_hash():
    assert sigv4.payload_hash(b"Welcome to Amazon S3.") == WELCOME_HASH
    assert sigv4.EMPTY_SHA256 == EMPTY


def test_uri_encoding_rules():
    assert sigv4.uri_encode("a b+c/d~e_f-g.h*") == "a%20b%2Bc%2Fd~e_f-g.h%2A"
    assert sigv4.uri_encode("a b/\u00e9", keep_slash=True) == "a%20b/%C3%A9"
    # S3 keys are signed as they are: no normalization of "//" or "."
    assert sigv4.canonical_uri("/bucket/a//./b") == "/bucket/a//./b"
    assert sigv4.canonical_uri("/bucket/a//./b", normalize=True) == "/bucket/a/b"
    # the query is sorted on the encoded names, so "%" orders before letters
    assert sigv4.canonical_query([("b", "2"), ("a b", ""), ("A", "x=y")]) == "A=x%3Dy&a%20b=&b=2"


def test_unsigned_payload_goes_into_the_canonical_request():
    signed = sigv4.sign(
        "PUT",
        "/b/k",
        [],
        [("Host", "h"), ("x-amz-content-sha256", sigv4.UNSIGNED_PAYLOAD)],
        sigv4.UNSIGNED_PAYLOAD,
        S3_KEY,
        "us-east-1",
        "s3",
        S3_DATE,
    )
    assert signed.canonical_request.endswith("\nUNSIGNED-PAYLOAD")
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date," in signed.authorization
