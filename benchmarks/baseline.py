"""The baseline: what the classic prebinders do (PHP XmppPrebind, punjab-era Python helpers,
the converse.js docs' examples), written plainly so that the engine is compared with something
real and working, not a straw man.

* a new TCP connection for every request (``Connection: close``, as a curl handle per request
  does; the one ``httpx.Client`` is built once, because building a client per request would add
  ~15 ms of SSL-context set-up per request and make the baseline a straw man);
* strictly sequential: create, auth, (SCRAM response), restart, bind, session, each waiting for
  the previous answer;
* PBKDF2 computed for every SCRAM login (``hashlib.pbkdf2_hmac``, no cache);
* the legacy RFC 3921 session IQ always sent;
* minimal parsing with lxml.

It verifies the SCRAM server signature and returns the same ``PrebindSession`` as the engine,
so the same liveness check and ``terminate`` apply.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import httpx
from lxml import etree

from bosh_middleware import PrebindSession

__all__ = ["BaselineError", "BaselinePrebinder"]

NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_STREAMS = "http://etherx.jabber.org/streams"
HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


class BaselineError(RuntimeError):
    pass


class BaselinePrebinder:
    def __init__(
        self,
        service_url: str,
        mechanism: str = "SCRAM-SHA-1",
        *,
        timeout: float = 10.0,
    ) -> None:
        self.url = service_url
        self.mechanism = mechanism
        self.client = httpx.Client(timeout=timeout)
        self.requests = 0

    def close(self) -> None:
        self.client.close()

    # one request, one connection
    def _post(self, body: str) -> etree._Element:
        r = self.client.post(
            self.url,
            content=body.encode(),
            headers={"Content-Type": "text/xml; charset=utf-8", "Connection": "close"},
        )
        self.requests += 1
        if r.status_code != 200:
            raise BaselineError(f"HTTP {r.status_code}")
        root = etree.fromstring(r.content)
        if root.get("type") == "terminate":
            raise BaselineError(f"terminated: {root.get('condition')}")
        return root

    def _send(self, payload: str = "") -> etree._Element:
        self.rid += 1
        return self._post(
            f"<body rid='{self.rid}' sid='{self.sid}' xmlns='{NS_BOSH}'>{payload}</body>"
        )

    @staticmethod
    def _find(root: etree._Element, tag: str) -> etree._Element | None:
        return root.find(".//" + tag)

    def prebind(self, jid: str, password: str) -> PrebindSession:
        user, domain = jid.split("@", 1)
        self.rid = secrets.randbelow(2**40) + 2**32
        self.requests = 0
        # 1. create
        root = self._post(
            f"<body content='text/xml; charset=utf-8' hold='1' rid='{self.rid}' to='{domain}'"
            f" ver='1.6' wait='60' xml:lang='en' xmpp:version='1.0' xmlns='{NS_BOSH}'"
            " xmlns:xmpp='urn:xmpp:xbosh'/>"
        )
        self.sid = root.get("sid")
        while self._find(root, f"{{{NS_SASL}}}mechanisms") is None:
            root = self._send()
        # 2. auth (+ SCRAM response)
        mech = self.mechanism
        if mech == "PLAIN":
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            root = self._send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        else:
            h = HASHES[mech]
            cnonce = base64.b64encode(secrets.token_bytes(18)).decode()
            first_bare = f"n={user},r={cnonce}"
            first = base64.b64encode(f"n,,{first_bare}".encode()).decode()
            root = self._send(f"<auth xmlns='{NS_SASL}' mechanism='{mech}'>{first}</auth>")
            challenge = self._find(root, f"{{{NS_SASL}}}challenge")
            if challenge is None:
                raise BaselineError("no SCRAM challenge")
            server_first = base64.b64decode(challenge.text or "").decode()
            attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
            salted = hashlib.pbkdf2_hmac(
                h, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
            )
            client_key = hmac.digest(salted, b"Client Key", h)
            stored_key = hashlib.new(h, client_key).digest()
            final_bare = f"c=biws,r={attrs['r']}"
            auth_message = f"{first_bare},{server_first},{final_bare}".encode()
            signature = hmac.digest(stored_key, auth_message, h)
            proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
            final = f"{final_bare},p={base64.b64encode(proof).decode()}"
            final_b64 = base64.b64encode(final.encode()).decode()
            root = self._send(f"<response xmlns='{NS_SASL}'>{final_b64}</response>")
            success = self._find(root, f"{{{NS_SASL}}}success")
            if success is None:
                raise BaselineError("SCRAM authentication failed")
            server_key = hmac.digest(salted, b"Server Key", h)
            expected = hmac.digest(server_key, auth_message, h)
            v = base64.b64decode(success.text or "").decode()
            if not hmac.compare_digest(base64.b64decode(v[2:]), expected):
                raise BaselineError("bad server signature")
        if self._find(root, f"{{{NS_SASL}}}success") is None:
            raise BaselineError("authentication failed")
        # 3. restart
        self.rid += 1
        root = self._post(
            f"<body rid='{self.rid}' sid='{self.sid}' to='{domain}' xml:lang='en'"
            f" xmpp:restart='true' xmlns='{NS_BOSH}' xmlns:xmpp='urn:xmpp:xbosh'/>"
        )
        # 4. bind
        resource = f"web-{secrets.token_hex(6)}"
        root = self._send(
            f"<iq id='bind_1' type='set' xmlns='jabber:client'><bind xmlns='{NS_BIND}'>"
            f"<resource>{resource}</resource></bind></iq>"
        )
        jid_el = self._find(root, f"{{{NS_BIND}}}jid")
        if jid_el is None:
            raise BaselineError("bind failed")
        # 5. legacy session
        root = self._send(
            f"<iq id='sess_1' type='set' xmlns='jabber:client'><session xmlns='{NS_SESSION}'/></iq>"
        )
        iq = root.find("{jabber:client}iq")
        if iq is None or iq.get("type") != "result":
            raise BaselineError("session failed")
        return PrebindSession(
            jid=jid_el.text or "",
            sid=self.sid or "",
            rid=self.rid + 1,
            service_url=self.url,
            mechanism=mech,
            request_count=self.requests,
            round_trips=self.requests,
        )
