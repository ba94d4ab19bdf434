/*
 * Browser side of bosh-middleware's real-browser test harness.
 *
 * Load after Strophe.js (the npm UMD bundle, which defines window.Strophe, $msg, $iq, $pres):
 *
 *   <script src="/static/strophe.js"></script>
 *   <script>var BOSH_SERVICE = "...", BOSH_JID = "...", BOSH_SID = "...", BOSH_RID = "...";</script>
 *   <script src="/static/attach-test.js"></script>
 *
 * Exposes window.boshTest (a BoshTestClient) and the class window.BoshTestClient for pages that
 * need more than one connection. Every method that waits returns a Promise with a bounded
 * timeout, so it can be awaited by Playwright's page.evaluate(); all state is plain data that
 * page.wait_for_function() can poll:
 *
 *   statuses      ["ATTACHED", ...]   every Strophe status change, by Strophe.Status name
 *   statusLog     [{status, condition, t}]
 *   iqResult      null | "result" | "error" | "timeout" | "disconnected"
 *                 outcome of the roster get sent in the first request after attach/connect
 *   iqResultXml   the IQ answer, serialised (null on timeout)
 *   firstRequest  the first BOSH body sent after ATTACHED/CONNECTED (proves what went out in it)
 *   received      [{from, to, type, body, id}]  incoming <message/>s that carry a <body/>
 *   traffic       [{dir: "out"|"in", data}]     every BOSH body, raw (capped)
 *   errors        [string]                      exceptions caught in handlers
 *   jid           the connection's full JID once ATTACHED/CONNECTED
 */
(function () {
    'use strict';

    if (typeof window.Strophe === 'undefined') {
        throw new Error('attach-test.js: load Strophe.js (strophe.umd.min.js) before this script');
    }
    const Strophe = window.Strophe;
    // Strophe's own DEBUG chatter is mostly noise next to the BOSH traffic recorded below;
    // set window.BOSH_TEST_STROPHE_DEBUG = true before loading this script to keep it.
    if (!window.BOSH_TEST_STROPHE_DEBUG && Strophe.setLogLevel && Strophe.LogLevel) {
        Strophe.setLogLevel(Strophe.LogLevel.INFO);
    }
    const STATUS_NAMES = {};
    Object.keys(Strophe.Status).forEach(function (name) {
        STATUS_NAMES[Strophe.Status[name]] = name;
    });
    const TERMINAL = ['CONNFAIL', 'AUTHFAIL', 'DISCONNECTED', 'ATTACHFAIL', 'CONNTIMEOUT', 'ERROR'];
    const MAX_TRAFFIC = 500;
    const DEFAULT_TIMEOUT_MS = 20000;
    const DEFAULT_IQ_TIMEOUT_MS = 10000;

    function serialize(el) {
        if (!el) return null;
        try {
            return new XMLSerializer().serializeToString(el);
        } catch (e) {
            return String(el);
        }
    }

    function bodyText(stanza) {
        const bodies = stanza.getElementsByTagName('body');
        return bodies.length ? bodies[0].textContent : null;
    }

    function withTimeout(promise, ms, what) {
        let timer;
        return Promise.race([
            promise,
            new Promise(function (_resolve, reject) {
                timer = setTimeout(function () {
                    reject(new Error('boshTest: timed out after ' + ms + ' ms waiting for ' + what));
                }, ms);
            }),
        ]).finally(function () {
            clearTimeout(timer);
        });
    }

    class BoshTestClient {
        constructor(name) {
            this.name = name || 'boshTest';
            this.reset();
        }

        reset() {
            this.connection = null;
            this.mode = null; // "attach" | "connect"
            this.jid = null;
            this.statuses = [];
            this.statusLog = [];
            this.iqResult = null;
            this.iqResultXml = null;
            this.firstRequest = null;
            this.received = [];
            this.traffic = [];
            this.errors = [];
            this._statusWaiters = [];
            this._messageWaiters = [];
            this._iqWaiters = [];
            this._awaitingFirstRequest = false;
        }

        log(...args) {
            console.log('[' + this.name + ']', ...args);
        }

        /** A JSON-friendly snapshot of everything recorded so far. */
        state() {
            return {
                name: this.name,
                mode: this.mode,
                jid: this.jid,
                statuses: this.statuses.slice(),
                statusLog: this.statusLog.slice(),
                iqResult: this.iqResult,
                iqResultXml: this.iqResultXml,
                firstRequest: this.firstRequest,
                received: this.received.slice(),
                errors: this.errors.slice(),
                connected: !!(this.connection && this.connection.connected),
            };
        }

        _newConnection(service) {
            if (!service) {
                throw new Error('boshTest: no BOSH service URL (pass {service} or set window.BOSH_SERVICE)');
            }
            if (this.connection) {
                throw new Error('boshTest: this client already has a connection; use new BoshTestClient()');
            }
            const conn = new Strophe.Connection(service);
            this.connection = conn;
            conn.rawOutput = (data) => {
                if (this._awaitingFirstRequest) {
                    this._awaitingFirstRequest = false;
                    this.firstRequest = data;
                }
                this._recordTraffic('out', data);
            };
            conn.rawInput = (data) => this._recordTraffic('in', data);
            conn.addHandler((stanza) => this._onMessage(stanza), null, 'message', null, null, null);
            return conn;
        }

        _recordTraffic(dir, data) {
            if (this.traffic.length < MAX_TRAFFIC) this.traffic.push({ dir: dir, data: data });
            console.debug('[' + this.name + '] BOSH ' + (dir === 'out' ? 'SENT' : 'RECV') + ' ' + data);
        }

        _onMessage(stanza) {
            try {
                const body = bodyText(stanza);
                if (body !== null) {
                    const msg = {
                        from: stanza.getAttribute('from'),
                        to: stanza.getAttribute('to'),
                        type: stanza.getAttribute('type'),
                        id: stanza.getAttribute('id'),
                        body: body,
                    };
                    this.received.push(msg);
                    this.log('message from', msg.from, ':', msg.body);
                    this._messageWaiters = this._messageWaiters.filter((w) => {
                        if (w.match(msg)) {
                            w.resolve(msg);
                            return false;
                        }
                        return true;
                    });
                }
            } catch (e) {
                this.errors.push('message handler: ' + e);
            }
            return true; // keep the handler
        }

        _onStatus(status, condition) {
            const name = STATUS_NAMES[status] || String(status);
            this.statuses.push(name);
            this.statusLog.push({ status: name, condition: condition || null, t: Date.now() });
            this.log('status', name, condition || '');
            if ((name === 'ATTACHED' || name === 'CONNECTED') && this.connection) {
                this.jid = this.connection.jid;
                this._afterSessionUp(name);
            }
            if (TERMINAL.indexOf(name) !== -1 && this.iqResult === null && this._iqSent) {
                this._setIqResult('disconnected', null);
            }
            this._statusWaiters = this._statusWaiters.filter((w) => {
                if (w.names.indexOf(name) !== -1) {
                    w.resolve(name);
                    return false;
                }
                if (TERMINAL.indexOf(name) !== -1 && w.names.indexOf(name) === -1) {
                    w.reject(new Error('boshTest: got ' + name + (condition ? ' (' + condition + ')' : '') +
                        ' while waiting for ' + w.names.join('/') + '; statuses: ' + this.statuses.join(', ')));
                    return false;
                }
                return true;
            });
        }

        // Right after ATTACHED/CONNECTED, synchronously (so both go out in the same, first, BOSH
        // request): initial presence and a roster get whose answer proves that request arrived.
        _afterSessionUp(statusName) {
            const conn = this.connection;
            this._awaitingFirstRequest = true;
            this._iqSent = true;
            try {
                conn.send(window.$pres());
                conn.sendIQ(
                    window.$iq({ type: 'get' }).c('query', { xmlns: 'jabber:iq:roster' }),
                    (stanza) => this._setIqResult('result', stanza),
                    (stanza) => this._setIqResult(stanza ? 'error' : 'timeout', stanza),
                    this._iqTimeout
                );
            } catch (e) {
                this.errors.push('after ' + statusName + ': ' + e);
                this.log('error after', statusName, String(e));
            }
        }

        _setIqResult(result, stanza) {
            if (this.iqResult !== null) return;
            this.iqResult = result;
            this.iqResultXml = serialize(stanza);
            this.log('roster IQ', result);
            const waiters = this._iqWaiters;
            this._iqWaiters = [];
            waiters.forEach((w) => w(result));
        }

        /** Resolves with the status name when one of `names` is reached; rejects on failure. */
        waitForStatus(names, timeoutMs) {
            names = Array.isArray(names) ? names : [names];
            const seen = this.statuses.find((s) => names.indexOf(s) !== -1);
            if (seen) return Promise.resolve(seen);
            const p = new Promise((resolve, reject) => {
                this._statusWaiters.push({ names: names, resolve: resolve, reject: reject });
            });
            return withTimeout(p, timeoutMs || DEFAULT_TIMEOUT_MS, 'status ' + names.join('/'));
        }

        /** Resolves with the outcome of the roster get ("result"/"error"/"timeout"/"disconnected"). */
        waitForIq(timeoutMs) {
            if (this.iqResult !== null) return Promise.resolve(this.iqResult);
            const p = new Promise((resolve) => this._iqWaiters.push(resolve));
            return withTimeout(p, timeoutMs || DEFAULT_TIMEOUT_MS, 'the roster IQ result');
        }

        /**
         * Resolves with the first received message matching {from, body} (from matches a bare
         * or full JID; omitted fields match anything), including messages that already arrived.
         */
        waitForMessage(opts) {
            opts = opts || {};
            const match = (m) => {
                if (opts.body !== undefined && opts.body !== null && m.body !== opts.body) return false;
                if (opts.from) {
                    const want = opts.from;
                    const from = m.from || '';
                    if (from !== want && Strophe.getBareJidFromJid(from) !== want) return false;
                }
                return true;
            };
            const already = this.received.find(match);
            if (already) return Promise.resolve(already);
            const p = new Promise((resolve) => this._messageWaiters.push({ match: match, resolve: resolve }));
            return withTimeout(p, opts.timeout || DEFAULT_TIMEOUT_MS,
                'a message' + (opts.from ? ' from ' + opts.from : '') +
                (opts.body !== undefined ? ' with body ' + JSON.stringify(opts.body) : ''));
        }

        /**
         * Take over a prebound BOSH session. Defaults: window.BOSH_SERVICE, BOSH_JID, BOSH_SID,
         * BOSH_RID. Resolves (never rejects for a protocol failure) with state() once the roster
         * get sent in the first request has an outcome: check .statuses and .iqResult.
         */
        attach(opts) {
            opts = opts || {};
            const service = opts.service || window.BOSH_SERVICE;
            const jid = opts.jid !== undefined ? opts.jid : window.BOSH_JID;
            const sid = opts.sid !== undefined ? opts.sid : window.BOSH_SID;
            const rid = opts.rid !== undefined ? opts.rid : window.BOSH_RID;
            const timeout = opts.timeout || DEFAULT_TIMEOUT_MS;
            this._iqTimeout = opts.iqTimeout || DEFAULT_IQ_TIMEOUT_MS;
            this.mode = 'attach';
            const conn = this._newConnection(service);
            this.log('attach', JSON.stringify({ service: service, jid: jid, sid: sid, rid: rid }));
            try {
                conn.attach(jid, sid, rid, (status, condition) => this._onStatus(status, condition));
            } catch (e) {
                this.errors.push('attach: ' + e);
                return Promise.reject(e);
            }
            if (this.statuses.indexOf('ATTACHED') === -1) {
                return Promise.resolve(this.state());
            }
            return this.waitForIq(timeout).then(() => this.state());
        }

        /**
         * Ordinary Strophe login (an independent client). Resolves with state() once CONNECTED
         * and the roster get sent with the initial presence is answered (so the server has
         * processed the presence); rejects on AUTHFAIL/CONNFAIL/... or timeout.
         */
        connect(opts) {
            opts = opts || {};
            const service = opts.service || window.BOSH_SERVICE;
            const timeout = opts.timeout || DEFAULT_TIMEOUT_MS;
            this._iqTimeout = opts.iqTimeout || DEFAULT_IQ_TIMEOUT_MS;
            this.mode = 'connect';
            const conn = this._newConnection(service);
            this.log('connect', opts.jid, 'via', service);
            const connected = this.waitForStatus(['CONNECTED'], timeout);
            conn.connect(opts.jid, opts.password, (status, condition) => this._onStatus(status, condition));
            return connected
                .then(() => this.waitForIq(timeout))
                .then((iq) => {
                    if (iq !== 'result') throw new Error('boshTest: roster get after login gave ' + iq);
                    return this.state();
                });
        }

        /** Send a chat message; returns its id. */
        send(to, body, type) {
            if (!this.connection) throw new Error('boshTest: not connected');
            const id = this.connection.getUniqueId('msg');
            this.connection.send(
                window.$msg({ to: to, type: type || 'chat', id: id }).c('body').t(body)
            );
            this.connection.flush();
            return id;
        }

        /** Disconnect cleanly; resolves with the last status (bounded). */
        disconnect(timeoutMs) {
            const conn = this.connection;
            if (!conn || !conn.connected) return Promise.resolve('DISCONNECTED');
            const p = this.waitForStatus(['DISCONNECTED'], timeoutMs || 5000);
            conn.disconnect('boshTest done');
            return p.catch((e) => {
                this.log('disconnect:', String(e));
                return this.statuses[this.statuses.length - 1] || null;
            });
        }
    }

    window.BoshTestClient = BoshTestClient;
    window.boshTest = new BoshTestClient('boshTest');
    window.addEventListener('error', function (ev) {
        window.boshTest.errors.push('window error: ' + ev.message);
    });
})();
