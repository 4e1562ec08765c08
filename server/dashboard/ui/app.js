// qbridge dashboard. Hand-written, no framework, no build step: it talks
// only to the JSON API of the same origin (see the Go package doc).
'use strict';

(() => {
  const POLL_MS = 2000;
  const TOKEN_KEY = 'qbridge.token';
  const MAX_TAIL = 500;
  const COLORS = {
    ready: '#2563eb', in_flight: '#d97706', delayed: '#7c3aed', dead: '#dc2626',
    enqueue: '#0891b2', ack: '#16a34a',
  };
  const DEPTH_SERIES = [
    ['ready', 'Ready'], ['in_flight', 'In flight'], ['delayed', 'Delayed'], ['dead', 'Dead'],
  ];
  const RATE_SERIES = [['enqueue', 'Enqueued'], ['ack', 'Acked']];

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    authRequired: false,
    needToken: false,
    route: { view: 'queues', queue: null },
    routeGen: 0,
    queues: new Map(),
    stats: null,
    history: null,
    msg: { state: 'ready', tokens: [''], page: 0, next: '', items: [], sig: '' },
    selected: new Set(),
    tail: null,
    tailCount: 0,
  };

  // ---------- helpers ----------

  // enc escapes a queue or channel name as one path segment ("." and ".."
  // too, which browsers and servers would otherwise resolve away).
  function enc(name) {
    return encodeURIComponent(name).replace(/\./g, '%2E');
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('data-') || k === 'role' || k.startsWith('aria-') || k === 'type' || k === 'href' || k === 'title' || k === 'scope') e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  const nf = new Intl.NumberFormat('en-US');
  function fmtInt(n) { return nf.format(Number(n) || 0); }
  function fmtRate(r) {
    r = Number(r) || 0;
    if (r === 0) return '0';
    if (r < 0.1) return r.toFixed(2);
    if (r < 10) return r.toFixed(1);
    return nf.format(Math.round(r));
  }
  function fmtAge(sec) {
    if (sec === null || sec === undefined) return '–';
    const s = Math.max(0, Math.floor(sec));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
    return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
  }
  function pad2(n) { return String(n).padStart(2, '0'); }
  function clock(d) { return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds()); }
  function when(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    const diff = (d.getTime() - Date.now()) / 1000;
    const rel = Math.abs(diff) < 1 ? 'now' : diff > 0 ? 'in ' + fmtAge(diff) : fmtAge(-diff) + ' ago';
    const day = d.toDateString() === new Date().toDateString() ? '' : d.toISOString().slice(0, 10) + ' ';
    return day + clock(d) + ' (' + rel + ')';
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function authHeaders(h) {
    if (state.token) h['Authorization'] = 'Bearer ' + state.token;
    return h;
  }

  // api calls the JSON API; it throws ApiError with the server's message.
  async function api(path, opts = {}) {
    const headers = authHeaders({ 'Accept': 'application/json' });
    let body;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    let resp;
    try {
      resp = await fetch(path, { method: opts.method || 'GET', headers, body, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new ApiError(0, 'cannot reach qbridged: ' + e.message);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
    if (!resp.ok) {
      const msg = (data && data.error) || text.trim() || resp.statusText;
      if (resp.status === 401) askToken(msg);
      throw new ApiError(resp.status, msg);
    }
    return data;
  }

  // ---------- banners and status ----------

  function showError(err, source) {
    const banner = $('#error-banner');
    const status = err && err.status ? 'HTTP ' + err.status + ': ' : '';
    $('#error-text').textContent = status + ((err && err.message) || String(err));
    banner.dataset.source = source;
    banner.dataset.status = err && err.status ? String(err.status) : '0';
    banner.hidden = false;
  }
  function clearError(source) {
    const banner = $('#error-banner');
    if (!source || banner.dataset.source === source) banner.hidden = true;
  }
  let noticeTimer = null;
  function notice(text) {
    const n = $('#notice');
    n.textContent = text;
    n.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { n.hidden = true; }, 5000);
  }
  function setStatus(text, bad) {
    const s = $('#status');
    s.textContent = text;
    s.classList.toggle('bad', !!bad);
  }

  // ---------- dialogs ----------

  function askToken(message) {
    state.needToken = true;
    $('#btn-token').hidden = false;
    const d = $('#token-dialog');
    const e = $('#token-error');
    e.textContent = message || '';
    e.hidden = !message;
    $('#token-input').value = '';
    setStatus('Sign in required', true);
    if (!d.open) d.showModal();
    $('#token-input').focus();
  }

  function setupTokenDialog() {
    const d = $('#token-dialog');
    $('#token-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('#token-input').value.trim();
      if (!t) return;
      state.token = t;
      sessionStorage.setItem(TOKEN_KEY, t);
      state.needToken = false;
      d.close();
      clearError();
      pollNow();
    });
    $('#token-clear').addEventListener('click', () => {
      state.token = '';
      sessionStorage.removeItem(TOKEN_KEY);
      $('#token-input').value = '';
    });
    d.addEventListener('cancel', (ev) => {
      if (state.needToken && state.authRequired) ev.preventDefault();
    });
    $('#btn-token').addEventListener('click', () => askToken(''));
  }

  // confirmDialog shows the confirmation dialog; it resolves to true when
  // the user confirms.
  function confirmDialog(title, message, okLabel) {
    const d = $('#confirm-dialog');
    $('#confirm-title').textContent = title;
    $('#confirm-message').textContent = message;
    $('#confirm-ok').textContent = okLabel || 'Confirm';
    return new Promise((resolve) => {
      const done = (v) => {
        $('#confirm-ok').removeEventListener('click', ok);
        $('#confirm-cancel').removeEventListener('click', cancel);
        d.removeEventListener('cancel', cancel);
        if (d.open) d.close();
        resolve(v);
      };
      const ok = () => done(true);
      const cancel = (ev) => { if (ev) ev.preventDefault(); done(false); };
      $('#confirm-ok').addEventListener('click', ok);
      $('#confirm-cancel').addEventListener('click', cancel);
      d.addEventListener('cancel', cancel);
      d.showModal();
      $('#confirm-cancel').focus();
    });
  }

  // act runs an action, after a confirmation when asked to.
  async function act(opts, fn, describe) {
    if (opts.confirm !== false && !(await confirmDialog(opts.title, opts.message, opts.ok))) return;
    const buttons = $$('#view-queue button');
    buttons.forEach((b) => { b.dataset.wasDisabled = b.disabled ? '1' : ''; b.disabled = true; });
    try {
      const r = await fn();
      clearError('action');
      notice(describe(r));
      state.selected.clear();
    } catch (e) {
      if (e.status !== 401) showError(e, 'action');
    } finally {
      buttons.forEach((b) => { b.disabled = b.dataset.wasDisabled === '1'; });
      state.msg.sig = '';
      pollNow();
    }
  }

  // ---------- routing ----------

  function parseRoute() {
    const h = location.hash.replace(/^#/, '');
    if (h.startsWith('/queues/') && h.length > 8) {
      let name = h.slice(8);
      try { name = decodeURIComponent(name); } catch (_) { /* keep as is */ }
      return { view: 'queue', queue: name };
    }
    if (h === '/pubsub') return { view: 'pubsub', queue: null };
    return { view: 'queues', queue: null };
  }

  function applyRoute() {
    const prev = state.route;
    const r = parseRoute();
    state.route = r;
    if (r.view !== prev.view || r.queue !== prev.queue) {
      state.routeGen++;
      state.stats = null;
      state.history = null;
      state.msg = { state: 'ready', tokens: [''], page: 0, next: '', items: [], sig: '' };
      state.selected.clear();
    }
    document.body.classList.toggle('route-queue', r.view === 'queue');
    $('#view-queues').hidden = r.view === 'pubsub';
    $('#view-queue').hidden = r.view !== 'queue';
    $('#view-pubsub').hidden = r.view !== 'pubsub';
    $('#nav-queues').classList.toggle('active', r.view !== 'pubsub');
    $('#nav-pubsub').classList.toggle('active', r.view === 'pubsub');
    if (r.view !== 'pubsub') stopTail();
    if (r.view === 'queue') {
      $('#detail-name').textContent = r.queue;
      document.title = r.queue + ' · qbridge';
      renderStats(null);
      renderMessages(true);
      drawCharts();
    } else {
      document.title = r.view === 'pubsub' ? 'Pub/sub · qbridge' : 'Queues · qbridge';
    }
    markSelectedRow();
    renderTabs();
    pollNow();
  }

  // ---------- polling ----------

  let pollTimer = null;
  let polling = false;
  let pollAgain = false;

  function pollNow() {
    clearTimeout(pollTimer);
    if (polling) { pollAgain = true; return; }
    poll();
  }

  async function poll() {
    if (state.needToken) return; // resumes when a token is given
    polling = true;
    try {
      if (!document.hidden) await refresh(); // a hidden tab skips updates
    } finally {
      polling = false;
    }
    if (pollAgain) { pollAgain = false; poll(); return; }
    clearTimeout(pollTimer);
    pollTimer = setTimeout(poll, POLL_MS);
  }

  async function refresh() {
    const r = state.route;
    if (r.view === 'pubsub') return;
    const gen = state.routeGen;
    const jobs = [loadQueues()];
    if (r.view === 'queue') jobs.push(loadDetail(r.queue, gen));
    const results = await Promise.allSettled(jobs);
    const failed = results.find((x) => x.status === 'rejected');
    if (failed) {
      const e = failed.reason;
      if (e.status === 401) return;
      showError(e, 'poll');
      setStatus('Update failed ' + clock(new Date()), true);
      return;
    }
    clearError('poll');
    setStatus('Updated ' + clock(new Date()));
  }

  // ---------- queue list ----------

  async function loadQueues() {
    const data = await api('/api/queues');
    renderQueues(data);
  }

  const COLUMNS = [
    ['ready', 'Ready', (q) => q.ready, fmtInt],
    ['in_flight', 'In flight', (q) => q.in_flight, fmtInt],
    ['delayed', 'Delayed', (q) => q.delayed, fmtInt],
    ['dead', 'Dead', (q) => q.dead, fmtInt],
    ['oldest', 'Oldest', (q) => q.oldest_ready_age_seconds, fmtAge],
    ['enqueue_rate', 'Enqueue/s', (q) => q.enqueue_rate, fmtRate],
    ['ack_rate', 'Ack/s', (q) => q.ack_rate, fmtRate],
    ['consumers', 'Consumers', (q) => q.consumers, fmtInt],
  ];

  function buildRow(name) {
    const tr = el('tr', { 'data-queue': name, 'data-testid': 'queue-row' });
    tr.append(el('td', { class: 'name', 'data-field': 'queue', 'data-label': 'Queue' },
      el('a', { href: '#/queues/' + enc(name), text: name })));
    for (const [field, label] of COLUMNS) {
      tr.append(el('td', { class: 'num ' + field, 'data-field': field, 'data-label': label }));
    }
    tr.append(el('td', { 'data-field': 'state', 'data-label': 'State' }));
    tr.addEventListener('click', (ev) => {
      if (ev.target.closest('a')) return;
      location.hash = '#/queues/' + enc(name);
    });
    return tr;
  }

  function renderQueues(data) {
    const tbody = $('#queue-rows');
    const rows = new Map(Array.from(tbody.rows).map((r) => [r.dataset.queue, r]));
    state.queues = new Map();
    data.queues.forEach((q, i) => {
      state.queues.set(q.queue, q);
      let tr = rows.get(q.queue);
      if (!tr) tr = buildRow(q.queue);
      rows.delete(q.queue);
      if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
      for (const [field, , get, fmt] of COLUMNS) {
        const td = tr.querySelector('td[data-field="' + field + '"]');
        const v = get(q);
        td.textContent = fmt(v);
        td.dataset.value = v === null || v === undefined ? '' : String(v);
        if (field === 'dead') td.classList.toggle('nonzero', v > 0);
      }
      const st = tr.querySelector('td[data-field="state"]');
      const label = q.paused ? 'paused' : 'active';
      if (st.textContent !== label) {
        st.replaceChildren(el('span', { class: 'badge ' + (q.paused ? 'warn' : 'ok'), text: label }));
      }
      st.dataset.value = label;
    });
    rows.forEach((tr) => tr.remove());
    $('#queue-empty').hidden = data.queues.length > 0;
    $('#queue-count').textContent = data.queues.length ? '(' + fmtInt(data.queues.length) + ')' : '';
    $('#queues-truncated').hidden = !data.truncated;
    markSelectedRow();
  }

  function markSelectedRow() {
    for (const tr of $$('#queue-rows tr')) {
      tr.classList.toggle('selected', state.route.view === 'queue' && tr.dataset.queue === state.route.queue);
    }
  }

  // ---------- queue detail ----------

  async function loadDetail(queue, gen) {
    const base = '/api/queues/' + enc(queue);
    const [stats, hist] = await Promise.all([api(base), api(base + '/history')]);
    if (gen !== state.routeGen) return;
    state.stats = stats;
    state.history = hist;
    renderStats(stats);
    drawCharts();
    if (state.msg.page === 0 && state.selected.size === 0 && !$('#confirm-dialog').open) {
      await loadMessages(gen);
    }
  }

  function setStat(id, text, value) {
    const e = $(id);
    e.textContent = text;
    e.dataset.value = value === null || value === undefined ? '' : String(value);
  }

  function renderStats(s) {
    if (!s) {
      for (const id of ['#stat-ready', '#stat-in-flight', '#stat-delayed', '#stat-dead', '#stat-oldest', '#stat-enqueue-rate', '#stat-ack-rate', '#stat-consumers']) setStat(id, '–', '');
      $('#detail-counters').textContent = '';
      $('#detail-paused').hidden = true;
      return;
    }
    setStat('#stat-ready', fmtInt(s.ready), s.ready);
    setStat('#stat-in-flight', fmtInt(s.in_flight), s.in_flight);
    setStat('#stat-delayed', fmtInt(s.delayed), s.delayed);
    setStat('#stat-dead', fmtInt(s.dead), s.dead);
    setStat('#stat-oldest', fmtAge(s.oldest_ready_age_seconds), s.oldest_ready_age_seconds);
    setStat('#stat-enqueue-rate', fmtRate(s.enqueue_rate), s.enqueue_rate);
    setStat('#stat-ack-rate', fmtRate(s.ack_rate), s.ack_rate);
    setStat('#stat-consumers', fmtInt(s.consumers), s.consumers);
    const c = s.counters || {};
    const parts = [
      fmtInt(c.enqueued) + ' enqueued', fmtInt(c.acked) + ' acked', fmtInt(c.nacked) + ' nacked',
      fmtInt(c.lease_expired) + ' lease expired', fmtInt(c.dead_lettered) + ' dead-lettered', fmtInt(c.expired) + ' expired',
    ];
    let text = 'Totals: ' + parts.join(' · ');
    const types = Object.keys(s.task_types || {}).sort();
    if (types.length) text += ' — task types: ' + types.map((t) => t + ' (' + fmtInt(s.task_types[t].enqueued) + ')').join(', ');
    const shards = s.shards || [];
    if (shards.length) text += ' — ' + shards.length + ' shards, ready / in flight: ' + shards.map((h) => '#' + h.shard + ' ' + fmtInt(h.ready) + ' / ' + fmtInt(h.in_flight)).join(', ');
    $('#detail-counters').textContent = text;
    $('#detail-paused').hidden = !s.paused;
    $('#btn-pause').hidden = s.paused;
    $('#btn-resume').hidden = !s.paused;
    renderTabs();
  }

  function renderTabs() {
    const s = state.stats;
    for (const b of $$('#message-tabs .tab')) {
      const st = b.dataset.state;
      b.classList.toggle('active', st === state.msg.state);
      b.setAttribute('aria-selected', st === state.msg.state ? 'true' : 'false');
      let count = b.querySelector('.count');
      if (!count) { count = el('span', { class: 'count' }); b.append(count); }
      count.textContent = s ? fmtInt(s[st]) : '';
    }
    $('#dead-actions').hidden = state.msg.state !== 'dead';
  }

  // ---------- messages ----------

  async function loadMessages(gen) {
    const q = state.route.queue;
    if (!q) return;
    if (gen === undefined) gen = state.routeGen;
    const m = state.msg;
    const wantState = m.state;
    const token = m.tokens[m.page] || '';
    let url = '/api/queues/' + enc(q) + '/messages?state=' + wantState + '&page_size=50';
    if (token) url += '&page_token=' + encodeURIComponent(token);
    const data = await api(url);
    if (gen !== state.routeGen || wantState !== state.msg.state) return;
    m.items = data.messages;
    m.next = data.next_page_token;
    renderMessages(false);
  }

  function renderMessages(reset) {
    const m = state.msg;
    const list = $('#message-list');
    if (reset) {
      list.replaceChildren();
      m.sig = '';
      $('#messages-empty').hidden = true;
      $('#btn-next-page').disabled = true;
      $('#btn-first-page').disabled = true;
      $('#page-label').textContent = '';
      return;
    }
    const sig = m.state + '|' + JSON.stringify(m.items);
    if (sig !== m.sig) {
      m.sig = sig;
      list.replaceChildren(...m.items.map(messageItem));
    }
    $('#messages-empty').hidden = m.items.length > 0;
    $('#btn-next-page').disabled = !m.next;
    $('#btn-first-page').disabled = m.page === 0;
    $('#page-label').textContent = m.items.length ? 'Page ' + (m.page + 1) : '';
    updateSelection();
  }

  function messageItem(msg) {
    const dead = msg.state === 'dead';
    const head = el('div', { class: 'msg-head' });
    if (dead) {
      const cb = el('input', { type: 'checkbox', class: 'select', 'data-testid': 'select-dead', 'aria-label': 'Select ' + msg.id });
      cb.checked = state.selected.has(msg.id);
      cb.addEventListener('change', () => {
        if (cb.checked) state.selected.add(msg.id); else state.selected.delete(msg.id);
        updateSelection();
      });
      head.append(cb);
    }
    head.append(el('span', { class: 'msg-id', text: msg.id }));
    if (msg.task_type) head.append(el('span', { class: 'badge', text: msg.task_type }));
    head.append(el('span', { class: 'badge', text: msg.deliveries + (msg.deliveries === 1 ? ' delivery' : ' deliveries') }));
    if (dead) {
      head.append(el('span', { class: 'spacer' }));
      const actions = el('span', { class: 'row-actions' });
      const replay = el('button', { class: 'btn small', type: 'button', 'data-action': 'replay', 'data-testid': 'replay-one', text: 'Replay' });
      const del = el('button', { class: 'btn small danger', type: 'button', 'data-action': 'delete', 'data-testid': 'delete-one', text: 'Delete' });
      replay.addEventListener('click', () => replayDead([msg.id]));
      del.addEventListener('click', () => deleteDead([msg.id]));
      actions.append(replay, del);
      head.append(actions);
    }
    const meta = el('div', { class: 'msg-meta' });
    if (msg.enqueue_time) meta.append(el('span', { text: 'enqueued ' + when(msg.enqueue_time) }));
    if (msg.deliver_time) meta.append(el('span', { text: 'due ' + when(msg.deliver_time) }));
    if (msg.lease_deadline) meta.append(el('span', { text: 'lease ends ' + when(msg.lease_deadline) }));
    if (msg.expire_time) meta.append(el('span', { text: 'expires ' + when(msg.expire_time) }));
    if (msg.dead_time) meta.append(el('span', { text: 'died ' + when(msg.dead_time) }));
    const headers = Object.entries(msg.headers || {});
    if (headers.length) meta.append(el('span', { text: 'headers: ' + headers.map(([k, v]) => k + '=' + v).join(', ') }));
    const li = el('li', { class: 'msg', 'data-id': msg.id, 'data-testid': 'message' }, head, meta);
    if (msg.dead_reason) li.append(el('div', { class: 'msg-error', text: 'Dead: ' + msg.dead_reason }));
    if (msg.last_error) li.append(el('div', { class: 'msg-error', text: 'Last error: ' + msg.last_error }));
    li.append(payloadBlock(msg));
    return li;
  }

  function payloadBlock(p) {
    const pre = el('pre', { class: 'payload' + (p.payload_encoding === 'base64' ? ' b64' : ''), 'data-testid': 'payload', text: p.payload });
    if (!p.payload_truncated) return pre;
    return el('div', {}, pre, el('span', { class: 'muted small', text: 'First 4 KiB of ' + fmtInt(p.payload_bytes) + ' bytes' }));
  }

  function updateSelection() {
    const n = state.selected.size;
    $('#btn-replay-selected').disabled = n === 0;
    $('#btn-delete-selected').disabled = n === 0;
    $('#btn-replay-selected').textContent = n ? 'Replay selected (' + n + ')' : 'Replay selected';
    $('#btn-delete-selected').textContent = n ? 'Delete selected (' + n + ')' : 'Delete selected';
    const boxes = $$('#message-list input.select');
    $('#dead-select-all').checked = boxes.length > 0 && boxes.every((b) => b.checked);
  }

  function replayDead(ids) {
    const q = state.route.queue;
    const all = ids === null;
    const what = all ? 'every dead letter of ' + q : (ids.length === 1 ? 'dead letter ' + ids[0] : ids.length + ' dead letters');
    act({ title: 'Replay dead letters?', message: 'Move ' + what + ' back to the tail of the ready queue, with attempts reset? Consumers will receive them again.', ok: 'Replay' },
      () => api('/api/queues/' + enc(q) + '/dead/replay', { method: 'POST', body: all ? { all: true } : { ids } }),
      (r) => 'Replayed ' + fmtInt(r.replayed) + (r.replayed === 1 ? ' dead letter' : ' dead letters') + ' of ' + q + '.');
  }

  function deleteDead(ids) {
    const q = state.route.queue;
    const all = ids === null;
    const what = all ? 'every dead letter of ' + q : (ids.length === 1 ? 'dead letter ' + ids[0] : ids.length + ' dead letters');
    act({ title: 'Delete dead letters?', message: 'Delete ' + what + ' for good? This cannot be undone.', ok: 'Delete' },
      () => api('/api/queues/' + enc(q) + '/dead/delete', { method: 'POST', body: all ? { all: true } : { ids } }),
      (r) => 'Deleted ' + fmtInt(r.deleted) + (r.deleted === 1 ? ' dead letter' : ' dead letters') + ' of ' + q + '.');
  }

  function setupDetail() {
    $('#btn-pause').addEventListener('click', () => {
      const q = state.route.queue;
      act({ title: 'Pause queue?', message: 'Stop deliveries from ' + q + ' on every qbridged instance? Producers can still enqueue; consumers receive nothing until it is resumed.', ok: 'Pause' },
        () => api('/api/queues/' + enc(q) + '/pause', { method: 'POST', body: {} }),
        () => 'Paused ' + q + '.');
    });
    $('#btn-resume').addEventListener('click', () => {
      const q = state.route.queue;
      act({ confirm: false },
        () => api('/api/queues/' + enc(q) + '/resume', { method: 'POST', body: {} }),
        () => 'Resumed ' + q + '.');
    });
    $('#btn-purge').addEventListener('click', () => {
      const q = state.route.queue;
      act({ title: 'Purge queue?', message: 'Remove every ready and delayed message of ' + q + '? In-flight messages and dead letters stay. This cannot be undone.', ok: 'Purge' },
        () => api('/api/queues/' + enc(q) + '/purge', { method: 'POST', body: {} }),
        (r) => 'Purged ' + fmtInt(r.purged) + ' messages from ' + q + '.');
    });
    $('#btn-replay-selected').addEventListener('click', () => replayDead(Array.from(state.selected)));
    $('#btn-delete-selected').addEventListener('click', () => deleteDead(Array.from(state.selected)));
    $('#btn-replay-all').addEventListener('click', () => replayDead(null));
    $('#btn-delete-all').addEventListener('click', () => deleteDead(null));
    $('#dead-select-all').addEventListener('change', (ev) => {
      for (const b of $$('#message-list input.select')) {
        b.checked = ev.target.checked;
        const id = b.closest('li').dataset.id;
        if (b.checked) state.selected.add(id); else state.selected.delete(id);
      }
      updateSelection();
    });
    for (const b of $$('#message-tabs .tab')) {
      b.addEventListener('click', () => {
        state.msg = { state: b.dataset.state, tokens: [''], page: 0, next: '', items: [], sig: '' };
        state.selected.clear();
        renderTabs();
        renderMessages(true);
        reloadMessages();
      });
    }
    $('#btn-refresh-messages').addEventListener('click', () => { state.msg.sig = ''; reloadMessages(); });
    $('#btn-next-page').addEventListener('click', () => {
      const m = state.msg;
      if (!m.next) return;
      m.tokens[m.page + 1] = m.next;
      m.page++;
      state.selected.clear();
      reloadMessages();
    });
    $('#btn-first-page').addEventListener('click', () => {
      state.msg.page = 0;
      state.selected.clear();
      reloadMessages();
    });
  }

  async function reloadMessages() {
    try {
      await loadMessages();
    } catch (e) {
      if (e.status !== 401) showError(e, 'action');
    }
  }

  // ---------- charts ----------

  function legend(id, series) {
    $(id).replaceChildren(...series.map(([key, label]) => {
      const sw = el('span', { class: 'sw' });
      sw.style.background = COLORS[key];
      return el('span', {}, sw, label);
    }));
  }

  // niceStep is the smallest of 1, 2, 5 times a power of ten that is at
  // least v.
  function niceStep(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v * 0.999999) return m * p;
    return 10 * p;
  }

  function fmtAxis(v) {
    const trim = (x) => String(Math.round(x * 100) / 100);
    if (v >= 1e6) return trim(v / 1e6) + 'M';
    if (v >= 1e3) return trim(v / 1e3) + 'k';
    return trim(v);
  }

  // drawChart draws series ([{color, points: [[ms, value]...]}]) as lines;
  // integers keeps the value axis at whole steps (for counts).
  function drawChart(canvas, series, emptyText, minSpan, integers) {
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = '11px system-ui, sans-serif';
    const pad = { l: 42, r: 8, t: 8, b: 20 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    let n = 0;
    let tMin = Infinity;
    let vMax = 0;
    for (const s of series) {
      for (const [t, v] of s.points) {
        n++;
        tMin = Math.min(tMin, t);
        vMax = Math.max(vMax, v);
      }
    }
    canvas.dataset.points = String(n);
    // The time axis runs from the first sample (at least minSpan back) to
    // now.
    const tMax = Date.now();
    if (n === 0 || !isFinite(tMin)) tMin = tMax - 60000;
    tMin = Math.min(tMin, tMax - minSpan);
    const span = tMax - tMin;
    const yStep = integers ? Math.max(1, niceStep((vMax || 1) / 4)) : niceStep((vMax || 1) / 4);
    const yTicks = Math.max(1, Math.ceil((vMax * 1.02) / yStep) || 1);
    const yMax = yStep * yTicks;
    const x = (t) => pad.l + ((t - tMin) / span) * pw;
    const y = (v) => pad.t + ph - (v / yMax) * ph;

    // grid and y labels
    ctx.strokeStyle = '#e5e7eb';
    ctx.fillStyle = '#6b7280';
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= yTicks; i++) {
      const v = yStep * i;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, yy);
      ctx.lineTo(w - pad.r, yy);
      ctx.stroke();
      ctx.fillText(fmtAxis(v), pad.l - 6, yy);
    }
    // x labels at a round step
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600].map((s) => s * 1000);
    const step = steps.find((s) => span / s <= Math.max(2, Math.floor(pw / 90))) || steps[steps.length - 1];
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (let t = Math.ceil(tMin / step) * step; t <= tMax; t += step) {
      const xx = x(t);
      if (xx < pad.l + 14 || xx > w - pad.r - 14) continue;
      const d = new Date(t);
      const label = step >= 60000 ? pad2(d.getHours()) + ':' + pad2(d.getMinutes()) : clock(d);
      ctx.fillText(label, xx, h - pad.b + 5);
    }
    if (n === 0) {
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.fillStyle = '#9ca3af';
      ctx.font = '13px system-ui, sans-serif';
      ctx.fillText(emptyText, pad.l + pw / 2, pad.t + ph / 2);
      return;
    }
    ctx.lineWidth = 2;
    ctx.lineJoin = 'round';
    for (const s of series) {
      if (!s.points.length) continue;
      ctx.strokeStyle = s.color;
      ctx.beginPath();
      s.points.forEach(([t, v], i) => {
        if (i === 0) ctx.moveTo(x(t), y(v)); else ctx.lineTo(x(t), y(v));
      });
      if (s.points.length === 1) ctx.lineTo(x(s.points[0][0]) + 2, y(s.points[0][1]));
      ctx.stroke();
    }
  }

  function drawCharts() {
    if (state.route.view !== 'queue') return;
    const samples = (state.history && state.history.samples) || [];
    const times = samples.map((s) => Date.parse(s.time));
    const depth = DEPTH_SERIES.map(([key]) => ({ color: COLORS[key], points: samples.map((s, i) => [times[i], s[key]]) }));
    const enq = [];
    const ack = [];
    for (let i = 1; i < samples.length; i++) {
      const dt = (times[i] - times[i - 1]) / 1000;
      if (dt <= 0) continue;
      enq.push([times[i], Math.max(0, (samples[i].enqueued - samples[i - 1].enqueued) / dt)]);
      ack.push([times[i], Math.max(0, (samples[i].acked - samples[i - 1].acked) / dt)]);
    }
    const emptyText = state.history && !state.history.sampled && state.history.samples.length === 0 && state.stats
      ? 'No history for this queue yet' : 'Collecting samples…';
    const h = state.history;
    const minSpan = Math.max(5000, (h ? h.interval_seconds * 1000 : 2000) * 15);
    drawChart($('#chart-depth'), depth, emptyText, minSpan, true);
    drawChart($('#chart-throughput'), [{ color: COLORS.enqueue, points: enq }, { color: COLORS.ack, points: ack }], emptyText, minSpan, false);
    $('#history-note').textContent = h
      ? 'Sampled every ' + h.interval_seconds + 's, up to ' + fmtAge(h.interval_seconds * h.capacity) + ' of history' + (h.sampled ? '.' : ' (this queue is not sampled yet).')
      : '';
  }

  // ---------- pub/sub tail ----------

  function setTailRunning(running) {
    $('#tail-start').disabled = running;
    $('#tail-stop').disabled = !running;
    $('#tail-channel').disabled = running;
    $('#tail-pattern').disabled = running;
  }

  function tailStatus(text, subscribed) {
    const s = $('#tail-status');
    s.textContent = text;
    s.dataset.subscribed = subscribed ? '1' : '';
  }

  function stopTail() {
    if (state.tail) {
      state.tail.abort();
      state.tail = null;
      tailStatus('Stopped.', false);
    }
    setTailRunning(false);
  }

  async function startTail(name, pattern) {
    stopTail();
    const ctrl = new AbortController();
    state.tail = ctrl;
    setTailRunning(true);
    tailStatus('Subscribing to ' + name + '…', false);
    const url = '/api/channels/' + enc(name) + '/tail' + (pattern ? '?pattern=1' : '');
    try {
      const resp = await fetch(url, { headers: authHeaders({ 'Accept': 'text/event-stream' }), signal: ctrl.signal, cache: 'no-store', credentials: 'omit' });
      if (!resp.ok) {
        const text = await resp.text();
        let msg = text;
        try { msg = JSON.parse(text).error || text; } catch (_) { /* not JSON */ }
        if (resp.status === 401) askToken(msg);
        throw new ApiError(resp.status, msg);
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n/g, '\n');
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          onTailEvent(block, name, pattern);
        }
      }
      if (state.tail === ctrl) tailStatus('The stream ended.', false);
    } catch (e) {
      if (ctrl.signal.aborted) return;
      if (e.status !== 401) showError(e instanceof ApiError ? e : new ApiError(0, 'tail: ' + e.message), 'tail');
      tailStatus('Not tailing: ' + e.message, false);
    } finally {
      if (state.tail === ctrl) {
        state.tail = null;
        setTailRunning(false);
      }
    }
  }

  function onTailEvent(block, name, pattern) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      const value = c < 0 ? '' : line.slice(c + 1).replace(/^ /, '');
      if (field === 'event') event = value;
      if (field === 'data') data.push(value);
    }
    if (!data.length) return;
    let d;
    try { d = JSON.parse(data.join('\n')); } catch (_) { return; }
    if (event === 'subscribed') {
      tailStatus('Tailing ' + (pattern ? 'pattern ' : 'channel ') + name + ' since ' + clock(new Date()) + '. Messages published from now on appear below.', true);
      clearError('tail');
    } else if (event === 'message') {
      state.tailCount++;
      const log = $('#tail-log');
      const meta = el('div', { class: 'meta' },
        el('span', { text: clock(new Date(d.time)) }),
        el('span', { class: 'chan', text: d.channel }),
        d.pattern ? el('span', { text: 'via ' + d.pattern }) : null,
        el('span', { text: fmtInt(d.payload_bytes) + ' bytes' }));
      log.prepend(el('li', { 'data-testid': 'tail-message', 'data-channel': d.channel }, meta, payloadBlock(d)));
      while (log.children.length > MAX_TAIL) log.lastElementChild.remove();
    } else if (event === 'error') {
      showError(new ApiError(d.status || 0, d.error), 'tail');
      tailStatus('The stream failed: ' + d.error, false);
    }
  }

  function setupPubsub() {
    $('#tail-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const name = $('#tail-channel').value.trim();
      if (name) startTail(name, $('#tail-pattern').checked);
    });
    $('#tail-stop').addEventListener('click', stopTail);
    $('#tail-clear').addEventListener('click', () => { $('#tail-log').replaceChildren(); state.tailCount = 0; });
  }

  // ---------- start ----------

  async function loadInfo() {
    for (;;) {
      try {
        return await api('/api/info');
      } catch (e) {
        showError(e, 'poll');
        setStatus('Cannot reach qbridged', true);
        await new Promise((r) => setTimeout(r, POLL_MS));
      }
    }
  }

  async function start() {
    legend('#legend-depth', DEPTH_SERIES);
    legend('#legend-throughput', RATE_SERIES);
    setupTokenDialog();
    setupDetail();
    setupPubsub();
    $('#error-close').addEventListener('click', () => { $('#error-banner').hidden = true; });
    window.addEventListener('hashchange', applyRoute);
    document.addEventListener('visibilitychange', () => { if (!document.hidden) pollNow(); });
    let resizeFrame = 0;
    window.addEventListener('resize', () => {
      cancelAnimationFrame(resizeFrame);
      resizeFrame = requestAnimationFrame(drawCharts);
    });
    const info = await loadInfo();
    clearError('poll');
    state.authRequired = !!info.auth_required;
    $('#version').textContent = info.version;
    $('#btn-token').hidden = !state.authRequired;
    if (state.authRequired && !state.token) askToken('');
    applyRoute();
  }

  start();
})();
