// progressbot's jobs page: fills the list from the server's data, then follows the SSE stream.
// Everything a job supplies is written with textContent (never innerHTML), so a name like
// <img src=x onerror=alert(1)> is shown as those characters. Rows are updated in place: an event
// touches only its own row's changed nodes, never the whole table.
'use strict';
(() => {
  const dataEl = document.getElementById('pb-data');
  if (!dataEl) return;
  const D = JSON.parse(dataEl.textContent);
  if (D.page !== 'jobs' && D.page !== 'job') return;

  const $ = (sel, root) => (root || document).querySelector(sel);
  const TERMINAL = new Set(D.terminal);
  const MAX_DONE = 200;
  // ?metrics: the bench reads event -> DOM latencies (ms) from window.pbMetrics.
  const metrics = new URLSearchParams(location.search).has('metrics')
    ? (window.pbMetrics = { lat: [], events: 0 }) : null;

  // ------------------------------------------------------------------ formatting
  function setText(el, value) {
    const t = value == null ? '' : String(value);
    if (el.textContent !== t) el.textContent = t;
  }
  function fmtNum(n) {
    if (n == null) return '';
    return Number.isInteger(n) ? String(n) : n.toFixed(1);
  }
  function fmtDur(sec) {
    if (sec == null || !isFinite(sec)) return '';
    let s = Math.max(0, Math.round(sec));
    if (s < 60) return s + 's';
    let m = Math.floor(s / 60); s %= 60;
    if (m < 60) return m + 'm ' + s + 's';
    const h = Math.floor(m / 60); m %= 60;
    return h < 48 ? h + 'h ' + m + 'm' : Math.floor(h / 24) + 'd';
  }
  function fmtTime(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }
  function percentOf(ev) {
    if (ev.status === 'completed') return 100;
    let p = ev.weightedPercent;
    if (p == null && ev.progress) p = ev.progress.percentage;
    return p == null ? null : Math.max(0, Math.min(100, p));
  }

  // --------------------------------------------------------------------- toasts
  const toasts = $('#toasts');
  function toast(text, opts) {
    const o = opts || {};
    const t = document.createElement('div');
    t.className = 'toast ' + (o.kind || 'info');
    t.setAttribute('role', o.kind === 'error' ? 'alert' : 'status');
    const msg = document.createElement('span');
    msg.textContent = text;
    t.appendChild(msg);
    if (o.href) {
      const a = document.createElement('a');
      a.href = o.href;
      a.textContent = o.linkText || 'View';
      t.appendChild(a);
    }
    const close = document.createElement('button');
    close.type = 'button';
    close.className = 'close';
    close.setAttribute('aria-label', 'Dismiss');
    close.textContent = '×';
    close.addEventListener('click', () => t.remove());
    t.appendChild(close);
    toasts.appendChild(t);
    setTimeout(() => t.remove(), o.ms || 10000);
    return t;
  }

  // -------------------------------------------------------------------- entries
  // key ("j12" / "b3") -> {ev, seq, isBatch, id, tbody, row, f (fields), bar, fill, btn, created, liveMark}
  const entries = new Map();
  const tpl = $('#entry-tpl');
  const tables = { active: $('#active'), done: $('#done'), detail: $('#detail') };
  let liveCounter = 0;

  const keyOf = (ev) => (ev.type === 'batch' ? 'b' : 'j') + ev.id;
  const batchOf = (ev) => (ev.type === 'job' && ev.jobDetails ? ev.jobDetails.batchId : null);

  function makeEntry(key, ev) {
    const tbody = tpl.content.firstElementChild.cloneNode(true);
    const row = tbody.firstElementChild;
    const f = {};
    for (const el of row.querySelectorAll('[data-f]')) f[el.dataset.f] = el;
    const btn = {};
    for (const b of row.querySelectorAll('button[data-act]')) btn[b.dataset.act] = b;
    const isBatch = ev.type === 'batch';
    const e = {
      key, ev: null, seq: -1, isBatch, id: ev.id, tbody, row, f, btn,
      bar: $('.bar', row), fill: $('.fill', row), expand: $('.expand', row),
      created: ev.createdAt || ev.timestamp || Date.now() / 1000, liveMark: 0, types: new Set(),
    };
    row.dataset.key = key;
    const label = isBatch ? 'batch b' + ev.id : 'job #' + ev.id;
    setText(f.link, isBatch ? 'b' + ev.id : '#' + ev.id);
    if (!isBatch) f.link.href = '/jobs/' + encodeURIComponent(ev.id);
    e.bar.setAttribute('aria-label', 'Progress of ' + label);
    for (const [act, b] of Object.entries(btn)) b.setAttribute('aria-label', b.textContent + ' ' + label);
    if (isBatch) {
      tbody.classList.add('batch');
      e.expand.hidden = false;
      e.expand.setAttribute('aria-label', 'Show the jobs of ' + label);
    }
    entries.set(key, e);
    return e;
  }

  // Where an entry lives: top-level entries in the active or finished table, batch jobs in their batch.
  function place(e, initial) {
    const bid = e.isBatch ? null : batchOf(e.ev);
    if (D.page === 'job') {
      if (!e.tbody.parentNode) tables.detail.appendChild(e.tbody);
      return;
    }
    if (bid != null) {
      let b = entries.get('b' + bid);
      if (!b) { // the batch's own event has not arrived yet: a placeholder it will fill
        b = makeEntry('b' + bid, { type: 'batch', id: bid, status: 'pending', timestamp: e.ev.timestamp });
        b.ev = { type: 'batch', id: bid, status: 'pending' };
        b.tbody.dataset.status = 'pending';
        place(b, initial);
      }
      if (e.row.parentNode !== b.tbody) {
        e.row.classList.add('child');
        b.tbody.appendChild(e.row);
      }
      if (e.ev.jobDetails && !b.types.has(e.ev.jobDetails.jobType)) {
        b.types.add(e.ev.jobDetails.jobType);
        filterEntry(b);
      }
      return;
    }
    const target = TERMINAL.has(e.ev.status) ? tables.done : tables.active;
    if (e.tbody.parentNode === target) return;
    if (initial) target.appendChild(e.tbody);
    else target.insertBefore(e.tbody, target.tBodies[0] || null);
    if (target === tables.done) trimDone();
    updateEmpty();
  }

  function trimDone() {
    const bodies = tables.done.tBodies;
    while (bodies.length > MAX_DONE) {
      const last = bodies[bodies.length - 1];
      for (const r of last.rows) entries.delete(r.dataset.key);
      last.remove();
    }
  }

  function updateEmpty() {
    const empty = $('#active-empty');
    if (empty) empty.hidden = tables.active.tBodies.length > 0;
  }

  function updateButtons(e) {
    const st = e.ev.status;
    for (const [act, b] of Object.entries(e.btn)) b.hidden = !(D.legal[act] || []).includes(st);
  }

  function render(e, ev) {
    const f = e.f;
    const st = ev.status;
    const prev = e.ev;
    e.ev = ev;
    if (!prev || prev.status !== st) {
      e.row.dataset.status = st;
      setText(f.status, st);
      updateButtons(e);
    }
    const jobType = ev.jobDetails ? ev.jobDetails.jobType : null;
    setText(f.name, ev.name || jobType || (e.isBatch ? 'batch' : 'job'));
    const bd = ev.batchDetails;
    // The type goes under the name, unless the name already is the type.
    setText(f.type, e.isBatch ? 'batch · ' + (bd ? bd.totalOperations : 0) + ' jobs' : (ev.name && ev.name !== jobType ? jobType : ''));
    const p = percentOf(ev);
    if (p == null || (ev.indeterminate && st !== 'completed')) {
      // No known percent: an empty bar, moving only while the job runs.
      if (e.bar.hasAttribute('aria-valuenow')) e.bar.removeAttribute('aria-valuenow');
      e.bar.classList.toggle('indeterminate', st === 'running');
      if (e.fill.style.transform !== 'scaleX(0)') e.fill.style.transform = 'scaleX(0)';
      setText(f.percent, '');
    } else {
      const v = String(Math.floor(p));
      e.bar.classList.remove('indeterminate');
      if (e.bar.getAttribute('aria-valuenow') !== v) e.bar.setAttribute('aria-valuenow', v);
      const scale = 'scaleX(' + (p / 100).toFixed(4) + ')';
      if (e.fill.style.transform !== scale) e.fill.style.transform = scale;
      setText(f.percent, v + '%');
    }
    let count = '';
    if (bd) {
      count = bd.completedOperations + '/' + bd.totalOperations + ' done';
      if (bd.failedOperations) count += ', ' + bd.failedOperations + ' failed';
    } else if (ev.progress && ev.progress.current != null) {
      count = fmtNum(ev.progress.current) + (ev.progress.total != null ? '/' + fmtNum(ev.progress.total) : '');
    }
    setText(f.count, count);
    const sg = ev.stage;
    setText(f.stage, sg && sg.name ? sg.name + (sg.count ? ' (' + (sg.index + 1) + '/' + sg.count + ')' : '') : '');
    const eta = ev.etaSeconds != null && !TERMINAL.has(st) && st !== 'paused' ? 'ETA ' + fmtDur(ev.etaSeconds) : '';
    setText(f.eta, eta);
    setText(f.message, st === 'failed' && ev.error ? ev.error : ev.message);
    setText(f.owner, ev.owner || '—');
    setText(f.room, ev.room || '—');
    setText(f.age, fmtDur(Date.now() / 1000 - e.created));
  }

  // Apply one event (from the page data, the stream, a submit or a resync). Older seqs are ignored.
  function apply(ev, how) {
    if (ev.type !== 'job' && ev.type !== 'batch') return null;
    const key = keyOf(ev);
    let e = entries.get(key);
    if (e && how !== 'resync' && ev.seq <= e.seq) return e;
    const prevStatus = e && e.ev ? e.ev.status : null;
    if (!e) e = makeEntry(key, ev);
    e.seq = Math.max(e.seq, ev.seq || 0);
    if (how !== 'initial') e.liveMark = ++liveCounter;
    render(e, ev);
    place(e, how === 'initial');
    if (prevStatus !== ev.status) filterEntry(e);
    const topLevel = e.isBatch || batchOf(ev) == null;
    if (how !== 'initial' && topLevel && prevStatus && !TERMINAL.has(prevStatus)
        && (ev.status === 'completed' || ev.status === 'failed')) {
      const what = e.isBatch ? 'Batch b' + ev.id : 'Job #' + ev.id;
      toast(what + ' ' + (ev.name ? '“' + ev.name + '” ' : '') + ev.status,
        { kind: ev.status === 'completed' ? 'ok' : 'error', href: e.isBatch ? null : '/jobs/' + ev.id });
    }
    if (D.page === 'job' && !e.isBatch && how !== 'initial') scheduleDetail();
    return e;
  }

  // -------------------------------------------------------------------- filters
  const fStatus = $('#f-status');
  const fType = $('#f-type');
  function matches(e) {
    const st = e.ev.status;
    const want = fStatus ? fStatus.value : '';
    if (want === 'active' && TERMINAL.has(st)) return false;
    if (want && want !== 'active' && st !== want) return false;
    const t = fType ? fType.value : '';
    if (!t) return true;
    return e.isBatch ? e.types.has(t) : !!(e.ev.jobDetails && e.ev.jobDetails.jobType === t);
  }
  function filterEntry(e) {
    if (D.page !== 'jobs' || e.row.classList.contains('child')) return;
    const hide = !matches(e);
    if (e.tbody.hidden !== hide) e.tbody.hidden = hide;
  }
  function filterAll() {
    for (const e of entries.values()) filterEntry(e);
    const q = new URLSearchParams(location.search);
    for (const [k, sel] of [['status', fStatus], ['type', fType]]) {
      if (sel.value) q.set(k, sel.value); else q.delete(k);
    }
    const s = q.toString();
    history.replaceState(null, '', location.pathname + (s ? '?' + s : ''));
  }
  if (fStatus && fType) {
    const q = new URLSearchParams(location.search);
    if (q.get('status')) fStatus.value = q.get('status');
    if (q.get('type')) fType.value = q.get('type');
    fStatus.addEventListener('change', filterAll);
    fType.addEventListener('change', filterAll);
  }

  // -------------------------------------------------------------------- actions
  async function postJSON(url, body) {
    const resp = await fetch(url, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify(body),
    });
    let data = null;
    try { data = await resp.json(); } catch (_) { data = null; }
    return { resp, data };
  }

  document.addEventListener('click', async (evt) => {
    const target = evt.target;
    if (!(target instanceof Element)) return;
    const exp = target.closest('.expand');
    if (exp) {
      const tb = exp.closest('tbody');
      const open = tb.classList.toggle('open');
      exp.setAttribute('aria-expanded', String(open));
      setText(exp, open ? '▾' : '▸');
      return;
    }
    const b = target.closest('button[data-act]');
    if (!b) return;
    const e = entries.get(b.closest('tr').dataset.key);
    if (!e) return;
    const act = b.dataset.act;
    const url = (e.isBatch ? '/v1/batches/' : '/v1/jobs/') + encodeURIComponent(e.id) + '/' + act;
    // No optimistic change: the row changes when the stream reports the new state.
    b.disabled = true;
    try {
      const { resp, data } = await postJSON(url, { actor: 'web' });
      if (resp.ok && D.page === 'job' && (!es || es.readyState === EventSource.CLOSED)) {
        finished = false; // a retried job runs again: follow it
        connect();
      }
      if (!resp.ok) {
        const detail = data && data.detail ? data.detail : 'HTTP ' + resp.status;
        toast('Could not ' + act + ' ' + (e.isBatch ? 'b' : '#') + e.id + ': ' + detail, { kind: 'error' });
      }
    } catch (err) {
      toast('Could not ' + act + ': the server is unreachable', { kind: 'error' });
    } finally {
      b.disabled = false;
    }
  });

  // ---------------------------------------------------------------- submit form
  const form = $('#submit');
  const argsInput = $('#s-args');
  const typeSelect = $('#s-type');
  function hint() {
    if (argsInput && typeSelect) argsInput.placeholder = (D.hints || {})[typeSelect.value] || '';
  }
  function clearErrors() {
    for (const el of form.querySelectorAll('[data-error-for]')) el.replaceChildren();
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
  }
  function showErrors(fields) {
    const own = { type: typeSelect, name: $('#s-name') };
    const payloadList = $('#err-payload');
    for (const [field, msg] of Object.entries(fields)) {
      if (own[field]) {
        own[field].setAttribute('aria-invalid', 'true');
        $('[data-error-for="' + field + '"]', form).textContent = msg;
      } else {
        argsInput.setAttribute('aria-invalid', 'true');
        const li = document.createElement('li');
        li.dataset.field = field;
        li.textContent = field === 'payload' || field === 'form' ? msg : field + ': ' + msg;
        payloadList.appendChild(li);
      }
    }
  }
  if (form) {
    hint();
    typeSelect.addEventListener('change', hint);
    form.addEventListener('submit', async (evt) => {
      evt.preventDefault();
      clearErrors();
      const go = $('#s-go');
      go.disabled = true;
      try {
        const { resp, data } = await postJSON('/web/submit', {
          type: typeSelect.value, args: argsInput.value, name: $('#s-name').value,
        });
        if (resp.status === 201 && data) {
          const e = apply(data.event, 'live');
          if (e) {
            e.row.classList.add('fresh');
            setTimeout(() => e.row.classList.remove('fresh'), 3000);
          }
          toast('Job #' + data.id + ' submitted', { kind: 'info', href: '/jobs/' + data.id, ms: 4000 });
          argsInput.value = '';
        } else if (data && data.fields) {
          showErrors(data.fields);
        } else {
          showErrors({ form: (data && data.detail) || 'HTTP ' + resp.status });
        }
      } catch (err) {
        showErrors({ form: 'the server is unreachable' });
      } finally {
        go.disabled = false;
      }
    });
  }

  // ------------------------------------------------------------------ job page
  let detailTimer = null;
  let detailBusy = false;
  function fillDetail(job) {
    const set = (id, v) => { const el = document.getElementById('d-' + id); if (el) setText(el, v); };
    set('attempts', job.attempts + ' of ' + job.max_attempts);
    for (const k of ['created_at', 'run_at', 'started_at', 'finished_at', 'updated_at']) set(k, fmtTime(job[k]));
    set('result', job.result == null ? '' : JSON.stringify(job.result, null, 2));
    set('error', job.error || '');
    if (job.result == null && !job.error) set('result', job.status === 'completed' ? '(no result)' : '(not finished)');
    const log = $('#d-activity');
    const items = job.activity.map((a) => {
      const li = document.createElement('li');
      li.className = 'lvl-' + a.level;
      const time = document.createElement('time');
      time.dateTime = a.at;
      time.textContent = fmtTime(a.at);
      const lvl = document.createElement('span');
      lvl.className = 'lvl';
      lvl.textContent = a.level;
      const msg = document.createElement('span');
      msg.className = 'text';
      msg.textContent = a.message;
      li.append(time, ' ', lvl, ' ', msg);
      return li;
    });
    if (!items.length) {
      const li = document.createElement('li');
      li.textContent = 'No activity yet.';
      items.push(li);
    }
    log.replaceChildren(...items);
  }
  // The log, result and timestamps are not in the events: refetch them, at most about once a second.
  function scheduleDetail() {
    if (detailTimer) return;
    detailTimer = setTimeout(async () => {
      detailTimer = null;
      if (detailBusy) { scheduleDetail(); return; }
      detailBusy = true;
      try {
        const resp = await fetch('/web/jobs/' + encodeURIComponent(D.job.id), { credentials: 'same-origin' });
        if (resp.ok) fillDetail(await resp.json());
      } catch (_) { /* the banner already says the server is away */ } finally { detailBusy = false; }
    }, 700);
  }

  // --------------------------------------------------------------------- stream
  const banner = $('#banner');
  function showBanner(text, withLogin) {
    if (!text) { banner.hidden = true; banner.replaceChildren(); return; }
    banner.replaceChildren(document.createTextNode(text));
    if (withLogin) {
      const a = document.createElement('a');
      a.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
      a.textContent = 'Log in';
      banner.append(' ', a);
    }
    banner.hidden = false;
  }

  let es = null;
  let lastSeq = D.after;
  let lost = false;
  let finished = false;
  function streamUrl() {
    const base = D.page === 'job' ? '/v1/events?job=' + encodeURIComponent(D.job.id) + '&' : '/v1/events?';
    return base + 'after=' + lastSeq;
  }
  function connect() {
    es = new EventSource(streamUrl());
    es.onopen = () => {
      showBanner(null);
      if (lost) { lost = false; resync(); }
    };
    es.onmessage = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (_) { return; }
      if (typeof ev.seq === 'number' && ev.seq > lastSeq) lastSeq = ev.seq;
      apply(ev, 'live');
      if (metrics && ev.timestamp) {
        metrics.events++;
        metrics.lat.push(Date.now() - ev.timestamp * 1000);
      }
    };
    es.addEventListener('end', () => { finished = true; es.close(); });
    es.onerror = () => {
      if (finished) return;
      lost = true;
      showBanner('reconnecting…');
      if (es.readyState === EventSource.CLOSED) {
        // The server answered with an error (not a dropped connection): find out whether we are signed out.
        setTimeout(async () => {
          try {
            const r = await fetch('/web/state?ids=', { credentials: 'same-origin' });
            if (r.status === 401) { showBanner('Your session has ended.', true); return; }
            if (r.ok) {
              await resync();
              const e = D.page === 'job' ? entries.get('j' + D.job.id) : null;
              // A finished job's stream answers 204: nothing more to follow.
              if (e && TERMINAL.has(e.ev.status)) { lost = false; showBanner(null); return; }
            }
          } catch (_) { /* still down */ }
          connect();
        }, 3000);
      }
    };
  }

  // After a reconnect: the current state of the active and listed unfinished jobs, applied where no live
  // event arrived meanwhile (a restarted service has no replay log of what happened while it was down).
  async function resync() {
    const mark = liveCounter;
    const ids = [];
    for (const e of entries.values()) if (!e.isBatch && e.ev && !TERMINAL.has(e.ev.status)) ids.push(e.id);
    if (D.page === 'job') ids.push(D.job.id);
    try {
      const r = await fetch('/web/state?ids=' + ids.join(','), { credentials: 'same-origin' });
      if (!r.ok) return;
      const data = await r.json();
      for (const ev of data.events) {
        if (D.page === 'job' && !(ev.type === 'job' && String(ev.id) === String(D.job.id))) continue;
        const e = entries.get(keyOf(ev));
        if (!e || e.liveMark <= mark) apply(ev, 'resync');
      }
      if (D.page === 'job') scheduleDetail();
    } catch (_) { /* the stream's next reconnect tries again */ }
  }

  // ---------------------------------------------------------------------- start
  if (D.page === 'jobs') {
    // Batches first (so their jobs find them), then a batch's jobs in order, then other jobs newest first.
    const rank = (ev) => (ev.type === 'batch' ? 0 : batchOf(ev) != null ? 1 : 2);
    const evs = D.events.slice().sort((a, b) => rank(a) - rank(b) || (rank(a) === 1 ? a.id - b.id : b.id - a.id));
    for (const ev of evs) apply(ev, 'initial');
    updateEmpty();
  } else {
    apply(D.event, 'initial');
    fillDetail(D.job);
  }
  setInterval(() => {
    const now = Date.now() / 1000;
    for (const e of entries.values()) if (!e.tbody.hidden) setText(e.f.age, fmtDur(now - e.created));
  }, 5000);
  if (!(D.page === 'job' && TERMINAL.has(D.event.status))) connect();
})();
