/*
 * Minimal chat on a prebound XMPP BOSH session (Strophe.js 5, no framework).
 *
 * The web app's middleware puts the session into the page, in <head>:
 *
 *   <script>var BOSH_JID="alice@localhost/web-…",BOSH_SID="…",BOSH_RID=…,BOSH_SERVICE="…";</script>
 *
 * and this script attaches to it: no password ever reaches the browser. Load it after
 * strophe.umd.min.js, at the end of a page that has the elements below (ids are the contract):
 *
 *   #chat (data-bosh-service: fallback BOSH URL), #xmpp-status, #me, #roster, #peer,
 *   #messages, #send-form, #send-to, #message, #add-form, #add-jid
 *
 * #chat[data-state] and #xmpp-status[data-state] follow the connection: "attaching" ->
 * "attached" (Strophe attached; nothing proven yet) -> "connected" (the server answered the
 * roster request sent in the first request after attach: session and RID are good), or
 * "unavailable" (no session in the page), "error", "disconnected".
 */
(function () {
    'use strict';

    const Strophe = window.Strophe;
    const $ = (id) => document.getElementById(id);
    const root = $('chat');
    const statusEl = $('xmpp-status');
    const rosterEl = $('roster');
    const messagesEl = $('messages');
    const sendForm = $('send-form');
    const sendTo = $('send-to');
    const input = $('message');
    const addForm = $('add-form');
    const addJid = $('add-jid');

    const STATUS = {};
    Object.keys(Strophe.Status).forEach((name) => { STATUS[Strophe.Status[name]] = name; });
    const IQ_TIMEOUT_MS = 15000;

    /** bare JID -> {jid, name, subscription, ask, resources: Map(resource -> show)} */
    const contacts = new Map();
    let connection = null;
    let myBare = null;
    let peer = null;

    function setState(state, text) {
        root.dataset.state = state;
        statusEl.dataset.state = state;
        statusEl.textContent = text;
    }

    function bare(jid) { return Strophe.getBareJidFromJid(jid || '') || ''; }

    // --- rendering (textContent only: nothing from the network is parsed as HTML) -------------
    function presenceOf(contact) {
        if (!contact.resources.size) return 'offline';
        const shows = Array.from(contact.resources.values());
        if (shows.includes('chat') || shows.includes('')) return 'online';
        return shows.includes('away') ? 'away' : shows[0];
    }

    function renderRoster() {
        rosterEl.textContent = '';
        const sorted = Array.from(contacts.values()).sort((a, b) => a.jid.localeCompare(b.jid));
        for (const contact of sorted) {
            const li = document.createElement('li');
            const presence = presenceOf(contact);
            li.className = 'contact' + (contact.jid === peer ? ' selected' : '');
            li.dataset.jid = contact.jid;
            li.dataset.presence = presence;
            const button = document.createElement('button');
            button.type = 'button';
            button.className = 'contact-name';
            button.textContent = contact.name || contact.jid;
            button.title = contact.jid;
            button.addEventListener('click', () => selectPeer(contact.jid));
            const dot = document.createElement('span');
            dot.className = 'presence';
            dot.textContent = presence + (contact.ask === 'subscribe' ? ' (asked)' : '');
            li.append(button, dot);
            rosterEl.append(li);
        }
        if (!sorted.length) {
            const li = document.createElement('li');
            li.className = 'empty';
            li.textContent = 'No contacts yet: add one below.';
            rosterEl.append(li);
        }
    }

    function selectPeer(jid) {
        peer = jid;
        const contact = contacts.get(jid);
        sendTo.textContent = contact && contact.name ? `${contact.name} <${jid}>` : jid;
        sendTo.dataset.jid = jid;
        input.disabled = false;
        renderRoster();
        input.focus();
    }

    function addMessage(direction, who, text, extraClass) {
        const li = document.createElement('li');
        li.className = `message ${direction}` + (extraClass ? ' ' + extraClass : '');
        li.dataset.from = direction === 'in' ? who : myBare;
        li.dataset.to = direction === 'in' ? myBare : who;
        const whoEl = document.createElement('span');
        whoEl.className = 'who';
        whoEl.textContent = direction === 'in' ? who : `me → ${who}`;
        const bodyEl = document.createElement('span');
        bodyEl.className = 'body';
        bodyEl.textContent = text;
        li.append(whoEl, bodyEl);
        messagesEl.append(li);
        messagesEl.scrollTop = messagesEl.scrollHeight;
    }

    // --- XMPP ----------------------------------------------------------------------------------
    function contactFromItem(item) {
        return {
            jid: bare(item.getAttribute('jid')),
            name: item.getAttribute('name') || '',
            subscription: item.getAttribute('subscription') || 'none',
            ask: item.getAttribute('ask') || '',
            resources: new Map(),
        };
    }

    function onRosterResult(iq) {
        for (const item of iq.getElementsByTagName('item')) {
            const contact = contactFromItem(item);
            if (contact.jid && contact.jid !== myBare) contacts.set(contact.jid, contact);
        }
        renderRoster();
        if (!peer && contacts.size) selectPeer(Array.from(contacts.keys()).sort()[0]);
        setState('connected', `Connected as ${connection.jid}`);
    }

    function onRosterPush(iq) {
        const from = iq.getAttribute('from');
        if (from && bare(from) !== myBare) return true; // only our server may push
        for (const item of iq.getElementsByTagName('item')) {
            const contact = contactFromItem(item);
            if (contact.subscription === 'remove') {
                contacts.delete(contact.jid);
            } else if (contact.jid !== myBare) {
                const old = contacts.get(contact.jid);
                if (old) contact.resources = old.resources;
                contacts.set(contact.jid, contact);
            }
        }
        connection.send($iq({ type: 'result', id: iq.getAttribute('id') }));
        renderRoster();
        if (!peer && contacts.size) selectPeer(Array.from(contacts.keys()).sort()[0]);
        return true;
    }

    function onPresence(pres) {
        const from = pres.getAttribute('from') || '';
        const who = bare(from);
        const type = pres.getAttribute('type') || '';
        if (who === myBare) return true; // our other tabs
        if (type === 'subscribe') {
            // Auto-accept, and ask back: both rosters end up with subscription "both".
            connection.send($pres({ to: who, type: 'subscribed' }));
            const contact = contacts.get(who);
            if (!contact || !['to', 'both'].includes(contact.subscription)) {
                connection.send($pres({ to: who, type: 'subscribe' }));
            }
            return true;
        }
        const contact = contacts.get(who);
        if (!contact) return true;
        const resource = Strophe.getResourceFromJid(from) || '';
        if (type === 'unavailable' || type === 'error') {
            contact.resources.delete(resource);
        } else if (!type) {
            const show = pres.getElementsByTagName('show');
            contact.resources.set(resource, show.length ? show[0].textContent : '');
        }
        renderRoster();
        return true;
    }

    function onMessage(msg) {
        const type = msg.getAttribute('type') || 'normal';
        const bodies = msg.getElementsByTagName('body');
        const who = bare(msg.getAttribute('from'));
        if (type === 'error') {
            addMessage('in', who, bodies.length ? `(not delivered) ${bodies[0].textContent}` :
                '(error)', 'error');
        } else if (bodies.length && (type === 'chat' || type === 'normal')) {
            addMessage('in', who, bodies[0].textContent);
            if (!peer) selectPeer(who);
        }
        return true;
    }

    function onStatus(status, condition) {
        const name = STATUS[status] || String(status);
        console.log('[chat] XMPP status', name, condition || '');
        if (status === Strophe.Status.ATTACHED) {
            myBare = bare(connection.jid);
            $('me').textContent = connection.jid;
            setState('attached', 'Attached, waiting for the server…');
            connection.addHandler(onMessage, null, 'message');
            connection.addHandler(onPresence, null, 'presence');
            connection.addHandler(onRosterPush, Strophe.NS.ROSTER, 'iq', 'set');
            // Both go out together in the first request after attach; an answer to the roster
            // get proves that request reached the session (the RID handed out was right).
            connection.sendIQ(
                $iq({ type: 'get' }).c('query', { xmlns: Strophe.NS.ROSTER }),
                onRosterResult,
                (iq) => setState('error', iq ? 'The server refused the roster request'
                    : 'The XMPP server did not answer: the session is gone (reload the page)'),
                IQ_TIMEOUT_MS,
            );
            connection.send($pres());
        } else if (status === Strophe.Status.DISCONNECTED || status === Strophe.Status.CONNFAIL ||
                   status === Strophe.Status.ATTACHFAIL || status === Strophe.Status.ERROR) {
            setState(status === Strophe.Status.DISCONNECTED ? 'disconnected' : 'error',
                `Disconnected (${name}${condition ? ': ' + condition : ''}); reload the page`);
            input.disabled = true;
        }
    }

    sendForm.addEventListener('submit', (event) => {
        event.preventDefault();
        const text = input.value.trim();
        if (!text || !peer || !connection || root.dataset.state !== 'connected') return;
        connection.send($msg({ to: peer, type: 'chat' }).c('body').t(text));
        addMessage('out', peer, text);
        input.value = '';
    });

    addForm.addEventListener('submit', (event) => {
        event.preventDefault();
        const jid = bare(addJid.value.trim().toLowerCase());
        if (!jid || !jid.includes('@') || !connection || jid === myBare) return;
        connection.sendIQ($iq({ type: 'set' }).c('query', { xmlns: Strophe.NS.ROSTER })
            .c('item', { jid: jid }));
        connection.send($pres({ to: jid, type: 'subscribe' }));
        addJid.value = '';
    });

    // Leaving the page: end the session now rather than after the server's inactivity timeout
    // (else the contact sees us online for another minute). A beacon survives the unload.
    window.addEventListener('pagehide', () => {
        const proto = connection && connection._proto;
        if (!proto || !proto.sid || !connection.connected || !navigator.sendBeacon) return;
        const body = `<body xmlns="http://jabber.org/protocol/httpbind" type="terminate" ` +
            `rid="${proto.rid}" sid="${proto.sid}"><presence xmlns="jabber:client" ` +
            `type="unavailable"/></body>`;
        navigator.sendBeacon(connection.service, new Blob([body], { type: 'text/plain' }));
    });
    // Chromium keeps such a page in its back/forward cache, no-store or not, and Back shows
    // it as it was left: its session ended above (or by the server since). Load it again,
    // with a session of its own.
    window.addEventListener('pageshow', (event) => {
        if (event.persisted) window.location.reload();
    });

    // --- go --------------------------------------------------------------------------------------
    input.disabled = true;
    renderRoster();
    if (!window.BOSH_SID || !window.BOSH_JID || !window.BOSH_RID) {
        // A page loaded ahead of time (a prefetch or prerender: speculation rules, Chromium's
        // address bar) has no session: the server makes none for a page the user may never
        // open. Opened, it is loaded again, as the navigation that gets one.
        const nav = performance.getEntriesByType('navigation')[0];
        if (document.prerendering) {
            document.addEventListener('prerenderingchange', () => window.location.reload(),
                { once: true });
            return;
        }
        if (nav && (nav.deliveryType === 'navigational-prefetch' || nav.activationStart > 0)) {
            window.location.reload();
            return;
        }
        setState('unavailable',
            'No XMPP session in this page: the web server could not prebind one (see its log)');
        return;
    }
    const service = window.BOSH_SERVICE || root.dataset.boshService;
    if (!service) {
        setState('error', 'No BOSH URL: set BOSH_PUBLIC_SERVICE_URL on the server');
        return;
    }
    setState('attaching', 'Attaching…');
    connection = new Strophe.Connection(service);
    window.chatConnection = connection; // for the curious, in the devtools console
    connection.attach(window.BOSH_JID, window.BOSH_SID, window.BOSH_RID, onStatus);
})();
