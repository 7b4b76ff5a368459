// tunneld monitor page.
//
// Data arrives by Server-Sent Events from /api/stats/stream (one `traffic` event on
// connect, then one per interval). If the stream cannot be opened or dies, the page
// polls /api/stats/traffic instead and keeps trying to get the stream back; if the
// daemon cannot be reached at all it says so and retries by itself. A 401 means an
// API token is configured: the page asks for it (kept in localStorage) instead of
// showing a broken page.
//
// Every rate on this page is (bytes now - bytes before) / (timestamp now - timestamp
// before), with the daemon's own sample timestamps: never an assumed interval, so a
// late or missed event cannot distort the numbers.
//
// For tests and scripts the state is visible in the DOM: body[data-state] and
// [data-testid=connection-status][data-state] (connecting | live | polling | lost |
// auth-required), [data-testid=traffic-chart][data-points], and data-testid on cards
// and table rows (see monitor.html). window.tunneldCharts.live() / .history() return
// copies of what the two charts drew: steps, gaps and tick marks.
'use strict';

(() => {
  const TOKEN_KEY = 'tunneld.apiToken';
  const LIVE_WINDOW_SECS = 30 * 60; // the live chart shows the last 30 minutes
  const MIN_WINDOW_SECS = 5 * 60;
  const DEFAULT_INTERVAL_MS = 3000;
  const MIN_INTERVAL_MS = 1000; // the daemon's own lower bound for ?interval_ms
  const SSE_RETRY_MS = 15000; // while polling, how often to try the stream again
  const MAX_BACKOFF_MS = 15000; // cap for retries while the daemon is unreachable

  // The page passes its own ?interval_ms on to the stream (handy for tests and for
  // operators who want a faster chart); the poller and watchdog use the same value.
  const pageParams = new URLSearchParams(location.search);
  const intervalMs = parseInterval(pageParams.get('interval_ms'));
  const passInterval = pageParams.has('interval_ms');

  // ---------- DOM handles ----------

  const $ = (sel, root = document) => root.querySelector(sel);
  const dom = {
    status: $('#status'),
    statusText: $('#status-text'),
    updated: $('#updated'),
    banner: $('#lost-banner'),
    bannerText: $('#lost-text'),
    footerMode: $('#footer-mode'),
    cards: {
      totalSent: $('[data-testid="card-total-sent"]'),
      totalRecv: $('[data-testid="card-total-received"]'),
      tunnelSent: $('[data-testid="card-tunnel-sent"]'),
      tunnelRecv: $('[data-testid="card-tunnel-received"]'),
      tunnel: $('[data-testid="card-tunnel-state"]'),
      mappings: $('[data-testid="card-mappings"]'),
    },
    rateSent: $('#rate-sent'),
    rateRecv: $('#rate-recv'),
    chartBox: $('#chart-box'),
    chartSub: $('#chart-sub'),
    canvas: $('#chart'),
    rows: $('#mapping-rows'),
    table: $('[data-testid="mapping-table"]'),
    empty: $('#mapping-empty'),
    tableSub: $('#table-sub'),
    clients: $('[data-testid="clients"]'),
    clientList: $('#client-list'),
    clientsSub: $('#clients-sub'),
    auth: $('#auth'),
    authForm: $('#auth-form'),
    authInput: $('#auth-token'),
    authError: $('#auth-error'),
  };

  // ---------- formatting ----------

  const BYTE_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

  /** Human bytes with binary units: "512 B", "1.50 KiB", "12.3 MiB", "456 GiB".
   * Three significant digits past bytes; tests re-implement exactly this rule. */
  function formatBytes(n) {
    if (!Number.isFinite(n) || n < 0) return '—';
    if (n < 1024) return `${Math.round(n)} B`;
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < BYTE_UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    const digits = value < 10 ? 2 : value < 100 ? 1 : 0;
    return `${value.toFixed(digits)} ${BYTE_UNITS[unit]}`;
  }

  function formatRate(bytesPerSec) {
    if (bytesPerSec == null || !Number.isFinite(bytesPerSec)) return '—';
    return `${formatBytes(bytesPerSec)}/s`;
  }

  const intFormat = new Intl.NumberFormat();

  /** "just now", "3 s ago", "4 min ago", "2 h ago", "5 d ago". */
  function formatAgo(seconds) {
    if (seconds == null || !Number.isFinite(seconds)) return 'never';
    const s = Math.max(0, Math.floor(seconds));
    if (s < 1) return 'just now';
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  /** "45 s", "12 min", "3 h 5 min", "2 d 4 h". */
  function formatDuration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  /** A latency: "85 µs", "4.2 ms", "152 ms", "1.25 s"; "—" when there is none. */
  function formatLatency(seconds) {
    if (seconds == null || !Number.isFinite(seconds)) return '—';
    if (seconds < 0.001) return `${Math.round(seconds * 1e6)} µs`;
    if (seconds < 0.1) return `${(seconds * 1e3).toFixed(1)} ms`;
    if (seconds < 1) return `${Math.round(seconds * 1e3)} ms`;
    return `${seconds.toFixed(2)} s`;
  }

  function formatClock(unixSecs) {
    const d = new Date(unixSecs * 1000);
    const sameDay = d.toDateString() === new Date().toDateString();
    return sameDay
      ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
      : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  function parseInterval(raw) {
    const n = Number.parseInt(raw, 10);
    return Number.isFinite(n) && n > 0 ? Math.max(MIN_INTERVAL_MS, n) : DEFAULT_INTERVAL_MS;
  }

  // ---------- token storage ----------

  // localStorage can throw (disabled storage, private modes); the page then still
  // works for the session with the token kept in memory.
  let memoryToken = null;
  function loadToken() {
    try { return localStorage.getItem(TOKEN_KEY) || memoryToken; } catch { return memoryToken; }
  }
  function saveToken(token) {
    memoryToken = token;
    try { localStorage.setItem(TOKEN_KEY, token); } catch { /* memory only */ }
  }
  function clearToken() {
    memoryToken = null;
    try { localStorage.removeItem(TOKEN_KEY); } catch { /* nothing stored */ }
  }

  // A token in the page URL (?token=...) is taken once and stored, then removed
  // from the address bar so it does not linger in history or screenshots.
  if (pageParams.get('token')) {
    saveToken(pageParams.get('token'));
    pageParams.delete('token');
    const query = pageParams.toString();
    window.history.replaceState(null, '', location.pathname + (query ? '?' + query : '') + location.hash);
  }

  // ---------- traffic state: samples, rates, chart history ----------

  let prev = null; // the previous sample (T), for rates
  let latest = null; // the newest sample and when it arrived (performance.now())
  let latestAt = 0;
  const rates = { sent: null, recv: null, tunnelSent: null, tunnelRecv: null, byPort: new Map(), byMapping: new Map(), byClient: new Map() };
  // The live chart draws two kinds of measurement, each as a flat step over the
  // time it covers (never a curve through them):
  //  - points: the page's samples, oldest first: {x: unix secs of the sample, span:
  //    secs back to the previous sample, sent, recv: bytes/s of all mappings,
  //    ports: Map port -> {sent, recv}};
  //  - minutes: the charted series' minute history, {from, to, sent, recv}, loaded
  //    on start and whenever the charted mapping changes.
  // port: the mapping charted alone, null for all of them.
  // holes: the history's `unrecorded` spans (no daemon was recording).
  const live = { points: [], minutes: [], holes: [], historyPoints: 0, historyInterval: 10, port: null, request: 0 };
  let historyStarted = false; // minute fill and History view load after the first sample

  /** Rate of a monotonic counter between two samples, or null when it cannot be
   * known (first sample, a counter that went backwards after a daemon restart). */
  function rate(now, before, dt) {
    if (before == null || now == null || !(dt > 0)) return null;
    const delta = now - before;
    return delta >= 0 ? delta / dt : null;
  }

  function ingest(sample) {
    // Polling and the stream can both deliver the same snapshot around a switch-over;
    // a sample not newer than the last adds nothing (and would divide by zero).
    if (latest && !(sample.timestamp > latest.timestamp)) return;
    prev = latest;
    latest = sample;
    latestAt = performance.now();
    // How many samples the page has taken in: lets tests wait for "N more updates".
    document.body.dataset.samples = String(Number(document.body.dataset.samples || 0) + 1);

    const dt = prev ? sample.timestamp - prev.timestamp : 0;
    rates.sent = prev ? rate(sample.total_sent, prev.total_sent, dt) : null;
    rates.recv = prev ? rate(sample.total_received, prev.total_received, dt) : null;
    rates.tunnelSent = prev ? rate(sample.tunnel.bytes_sent, prev.tunnel.bytes_sent, dt) : null;
    rates.tunnelRecv = prev ? rate(sample.tunnel.bytes_received, prev.tunnel.bytes_received, dt) : null;
    // Per mapping: UDP 53 and TCP 53 are two (`protocol` absent: a daemon from before UDP).
    const mappingKey = (m) => `${m.port}/${m.protocol || 'tcp'}`;
    const before = new Map((prev ? prev.mappings : []).map((m) => [mappingKey(m), m]));
    rates.byMapping = new Map(sample.mappings.map((m) => {
      const p = before.get(mappingKey(m));
      return [mappingKey(m), {
        sent: p ? rate(m.bytes_sent, p.bytes_sent, dt) : null,
        recv: p ? rate(m.bytes_received, p.bytes_received, dt) : null,
      }];
    }));
    // Per port (what the chart follows): its mappings of both protocols together.
    rates.byPort = new Map();
    for (const m of sample.mappings) {
      const r = rates.byMapping.get(mappingKey(m));
      const sum = rates.byPort.get(m.port);
      const add = (a, b) => (a == null || b == null ? null : a + b);
      rates.byPort.set(m.port, sum ? { sent: add(sum.sent, r.sent), recv: add(sum.recv, r.recv) } : { ...r });
    }
    // Per client by name: a client removed and re-created under the same name starts
    // again from zero, which rate() reads as "unknown", not as a negative rate.
    const clientsBefore = new Map(clientsOf(prev).map((c) => [c.name, c]));
    rates.byClient = new Map(clientsOf(sample).map((c) => {
      const p = clientsBefore.get(c.name);
      return [c.name, {
        sent: p ? rate(c.bytes_sent, p.bytes_sent, dt) : null,
        recv: p ? rate(c.bytes_received, p.bytes_received, dt) : null,
      }];
    }));

    // A rate averaged over a long silence (the daemon or the network was away)
    // would draw a flat line over the outage; the chart shows a gap there instead.
    if (rates.sent != null && rates.recv != null && dt <= maxSampleGap()) {
      addLivePoint({ x: sample.timestamp, sent: rates.sent, recv: rates.recv, span: dt, ports: rates.byPort });
    }
    if (!historyStarted) {
      historyStarted = true;
      loadMinuteHistory();
      loadHistory();
    }
    render();
  }

  /** Longest distance between two samples that still counts as "no gap". */
  function maxSampleGap() {
    return Math.max(3 * intervalMs / 1000, 10);
  }

  function addLivePoint(point) {
    const pts = live.points;
    // Keep the array ordered by time (minute history may arrive after samples).
    let i = pts.length;
    while (i > 0 && pts[i - 1].x > point.x) i -= 1;
    if (i > 0 && pts[i - 1].x === point.x) return;
    pts.splice(i, 0, point);
    const oldest = serverNow() - LIVE_WINDOW_SECS - 120;
    while (pts.length && pts[0].x < oldest) pts.shift();
  }

  /** The live chart starts with the charted series' last 30 minutes of minute
   * history, so a reload does not start from an empty chart: each minute one step
   * at its average rate. The minute in progress counts up to the answer's `as_of`,
   * once it is at least one recorder interval long (before that its bytes are
   * mostly the previous minute's: the recorder files bytes under the minute it
   * writes them in). Minutes the daemon was not recording are absent, and the
   * answer's `unrecorded` spans (the daemon was down, also for less than a
   * minute) are cut out of their minutes: gaps either way. */
  async function loadMinuteHistory() {
    const request = ++live.request;
    const port = live.port;
    const now = Math.floor(serverNow());
    try {
      const data = await fetchApi(`/api/stats/history?step=minute&from=${now - LIVE_WINDOW_SECS}&to=${now + 60}${port == null ? '' : `&port=${port}`}`);
      if (request !== live.request) return; // another mapping was chosen meanwhile
      const asOf = Number.isFinite(data.as_of) ? data.as_of : now;
      const interval = data.interval_secs > 0 ? data.interval_secs : 10;
      const holes = (data.unrecorded || []).filter((h) => h.to > h.from);
      const minutes = [];
      for (const p of data.points) {
        // The parts of this minute some daemon recorded; its bytes moved in them.
        let pieces = [{ from: p.t, to: Math.min(p.t + 60, asOf) }];
        for (const h of holes) {
          pieces = pieces.flatMap((c) => (h.to <= c.from || h.from >= c.to ? [c]
            : [{ from: c.from, to: h.from }, { from: h.to, to: c.to }].filter((x) => x.to > x.from)));
        }
        const recorded = pieces.reduce((sum, c) => sum + (c.to - c.from), 0);
        if (recorded < Math.min(60, interval)) continue;
        for (const c of pieces) minutes.push({ ...c, sent: p.bytes_sent / recorded, recv: p.bytes_received / recorded });
      }
      live.minutes = minutes;
      live.holes = holes;
      live.historyInterval = interval;
      live.historyPoints = minutes.length;
      dom.chartBox.dataset.historyPoints = String(minutes.length);
      renderChart();
    } catch (err) {
      if (err instanceof AuthError) needToken();
      // Otherwise the chart simply starts from the live samples.
    }
  }

  // The daemon's clock is the reference for "3 s ago": its sample timestamp plus the
  // time since the sample arrived. The browser's clock may be off from the server's.
  function serverNow() {
    return latest ? latest.timestamp + (performance.now() - latestAt) / 1000 : Date.now() / 1000;
  }

  // ---------- rendering ----------

  function setCard(card, text, attrs = {}) {
    const value = $('[data-role="value"]', card);
    value.textContent = text;
    for (const [k, v] of Object.entries(attrs)) value.setAttribute(k, String(v));
  }

  function setSub(card, text) {
    $('[data-role="sub"]', card).textContent = text;
  }

  function setLifetime(card, bytes) {
    const line = $('[data-role="lifetime"]', card);
    if (bytes == null) return;
    line.textContent = `Lifetime ${formatBytes(bytes)}`;
    line.dataset.bytes = String(bytes);
  }

  function render() {
    const d = latest;
    if (!d) return;
    const c = dom.cards;
    setCard(c.totalSent, formatBytes(d.total_sent), { 'data-bytes': d.total_sent });
    setCard(c.totalRecv, formatBytes(d.total_received), { 'data-bytes': d.total_received });
    setCard(c.tunnelSent, formatBytes(d.tunnel.bytes_sent), { 'data-bytes': d.tunnel.bytes_sent });
    setCard(c.tunnelRecv, formatBytes(d.tunnel.bytes_received), { 'data-bytes': d.tunnel.bytes_received });
    // "Total" counts since this daemon started; say since when, and show the
    // lifetime figure (across restarts) beside it.
    const since = d.started_at ? `since ${formatAxisClock(d.started_at)}` : 'since the daemon started';
    setSub(c.totalSent, rates.sent == null ? since : `${since} · ${formatRate(rates.sent)}`);
    setSub(c.totalRecv, rates.recv == null ? since : `${since} · ${formatRate(rates.recv)}`);
    const sinceTitle = d.started_at ? `Counted since the daemon started (${formatClock(d.started_at)}); lifetime: across restarts` : '';
    $('[data-role="sub"]', c.totalSent).title = sinceTitle;
    $('[data-role="sub"]', c.totalRecv).title = sinceTitle;
    setLifetime(c.totalSent, d.lifetime_sent);
    setLifetime(c.totalRecv, d.lifetime_received);
    // With several clients the tunnel cards are their sum (the daemon adds them up).
    const whom = clientsOf(d).length > 1 ? 'all clients' : 'the client';
    setSub(c.tunnelSent, rates.tunnelSent == null ? `wire bytes to ${whom}` : `${formatRate(rates.tunnelSent)} now`);
    setSub(c.tunnelRecv, rates.tunnelRecv == null ? `wire bytes from ${whom}` : `${formatRate(rates.tunnelRecv)} now`);

    const count = d.mapping_count ?? d.mappings.length;
    const open = d.active_connections ?? d.mappings.reduce((sum, m) => sum + (m.active_connections || 0), 0);
    setCard(c.mappings, String(count), { 'data-count': count });
    const conn = $('[data-role="connections"]', c.mappings);
    conn.textContent = intFormat.format(open);
    conn.dataset.count = String(open);
    $('[data-role="connections-label"]', c.mappings).textContent = open === 1 ? 'open connection' : 'open connections';

    const charted = chartedRates();
    dom.rateSent.textContent = formatRate(charted.sent);
    dom.rateRecv.textContent = formatRate(charted.recv);

    renderTunnel();
    renderClients();
    renderTable();
    markChartedRow();
    renderChart();
    renderClock();
  }

  /** The sample's clients (sorted by name by the daemon); empty for a sample
   * without them. */
  function clientsOf(sample) {
    return sample && Array.isArray(sample.clients) ? sample.clients : [];
  }

  /** A client that tunneled mappings name and that is not connected: its
   * visitors are being turned away, which is what /health calls degraded. */
  function clientMissed(c) {
    return !c.connected && c.mappings > 0;
  }

  function renderTunnel() {
    const card = dom.cards.tunnel;
    if (!latest) return;
    const stateText = $('[data-role="state-text"]', card);
    // While the daemon cannot be reached, its last word on the tunnel is stale:
    // claiming "Connected" would be a guess.
    if (document.body.dataset.state === 'lost') {
      card.dataset.connected = 'unknown';
      card.dataset.health = 'unknown';
      stateText.textContent = 'Unknown';
      setSub(card, 'daemon unreachable');
      return;
    }
    const t = latest.tunnel;
    const clients = clientsOf(latest);
    const up = clients.filter((c) => c.connected);
    const missed = clients.filter(clientMissed);
    const connected = Boolean(t.connected);
    card.dataset.connected = String(connected);
    card.dataset.clients = String(clients.length);
    card.dataset.clientsConnected = String(up.length);
    // The dot is green only while every client that mappings need is there.
    card.dataset.health = missed.length ? 'degraded' : 'ok';
    $('[data-role="sub"]', card).title = '';
    if (clients.length > 1) {
      // Several clients: one "Connected" would hide the ones that are away.
      // "2 of 3" large, "connected" small: fits a card a sixth of the page wide.
      stateText.replaceChildren(el('span', { class: 'card-count' }, `${up.length} of ${clients.length}`), ' ', el('span', { class: 'card-unit' }, 'connected'));
      // Those that mappings wait for first; the full list is in the tooltip.
      const away = [...missed, ...clients.filter((c) => !c.connected && !clientMissed(c))].map((c) => c.name);
      let sub;
      if (!away.length) sub = 'all clients connected';
      else if (tunnelEnabled === false) sub = 'tunnel listener disabled';
      else if (away.length <= 2) sub = `not connected: ${away.join(', ')}`;
      else sub = `not connected: ${away.slice(0, 2).join(', ')} +${away.length - 2} more`;
      setSub(card, sub);
      $('[data-role="sub"]', card).title = away.length ? `not connected: ${away.join(', ')}` : '';
      return;
    }
    stateText.textContent = connected ? 'Connected' : 'Not connected';
    let sub;
    if (connected && t.connected_since) {
      sub = `since ${formatClock(t.connected_since)} · ${formatDuration(serverNow() - t.connected_since)}`;
    } else if (connected) {
      sub = 'client authenticated';
    } else {
      sub = tunnelEnabled === false ? 'tunnel listener disabled' : 'waiting for a client';
    }
    setSub(card, sub);
  }

  /** One card per client: state, peer, since when, wire traffic and rate, and how
   * many mappings name it. Rebuilt with each sample, like the mappings table. */
  function renderClients() {
    if (!latest) return;
    const clients = clientsOf(latest);
    // A daemon that sends no `clients` (none known) gets no empty section.
    dom.clients.hidden = clients.length === 0;
    if (!clients.length) return;
    const lost = document.body.dataset.state === 'lost';
    const up = clients.filter((c) => c.connected).length;
    dom.clientsSub.textContent = lost
      ? `${clients.length === 1 ? '1 client' : `${clients.length} clients`} · state unknown while the daemon is unreachable`
      : `${up} of ${clients.length} connected · wire bytes per client, since the daemon started`;
    // Clients that mappings wait for come first (the list scrolls when long), the
    // rest keep the daemon's order by name.
    const ordered = lost ? clients : [...clients.filter(clientMissed), ...clients.filter((c) => !clientMissed(c))];
    dom.clientList.replaceChildren(...ordered.map((c) => clientCard(c, rates.byClient.get(c.name) || {}, lost)));
    renderClientClocks();
  }

  const FACT_TITLES = {
    peer: 'Address the client connects from',
    sent: 'Tunnel wire bytes from this server to the client (control and data, TLS included)',
    received: 'Tunnel wire bytes from the client to this server',
    mappings: 'Mappings that are served through this client',
    rtt: 'Round trip of the tunnel, measured by the latest heartbeat and its echo',
    udp: 'How UDP mappings\' datagrams travel to this client: as QUIC datagrams, or framed on a tunnel data channel where UDP to the server is blocked (and always on a plain tunnel)',
  };
  const UDP_TRANSPORTS = { quic: 'QUIC datagrams', framed: 'Framed on TCP' };

  function clientCard(c, r, lost) {
    const state = lost ? 'unknown' : String(Boolean(c.connected));
    const badge = lost
      ? el('span', { class: 'badge', 'data-role': 'state' }, 'Unknown')
      : c.connected
        ? el('span', { class: 'badge badge-ok', 'data-role': 'state' }, 'Connected')
        // Away with mappings waiting is a problem; away with none is just idle.
        : el('span', { class: `badge ${clientMissed(c) ? 'badge-warn' : ''}`, 'data-role': 'state' }, 'Not connected');
    const fact = (label, role, ...value) => [
      el('dt', { title: FACT_TITLES[role] }, label),
      el('dd', { 'data-role': role }, ...value),
    ];
    const traffic = (bytes, perSec) => [
      el('span', { 'data-role': 'value', 'data-bytes': bytes }, formatBytes(bytes)),
      perSec == null ? null : el('span', { class: 'client-rate', 'data-role': 'rate' }, formatRate(perSec)),
    ];
    // Connected: for how long (ticks every second) and since when. Away: when the
    // tunnel last moved bytes, if ever since the daemon started. Daemon unreachable:
    // only when the session began; a running duration would claim it still runs.
    const clock = (prefix) => el('time', { class: 'client-clock', 'data-role': 'clock',
      datetime: new Date(c.connected_since * 1000).toISOString(), title: new Date(c.connected_since * 1000).toLocaleString() },
    `${prefix}${formatClock(c.connected_since)}`);
    let since;
    if (c.connected && c.connected_since != null && lost) {
      since = fact('Connected at', 'since', clock(''));
    } else if (c.connected && c.connected_since != null) {
      since = fact('Connected', 'since',
        el('span', { 'data-role': 'ago', 'data-ts': c.connected_since, 'data-kind': 'duration' }), clock('since '));
    } else {
      since = fact('Last active', 'since', el('span', { 'data-role': 'ago', 'data-ts': c.last_update ?? '', 'data-kind': 'ago' }));
    }
    const count = c.mappings ?? 0;
    return el('article', { class: 'client', 'data-testid': 'client-card', 'data-name': c.name, 'data-connected': state,
      'data-missed': String(!lost && clientMissed(c)), id: `client-${c.name}` },
    el('header', { class: 'client-head' },
      el('span', { class: 'dot', 'aria-hidden': 'true' }),
      el('h3', { class: 'client-name', 'data-role': 'name', title: c.name }, c.name),
      badge),
    el('dl', { class: 'client-facts' },
      ...fact('Peer', 'peer', c.peer ?? '—'),
      ...since,
      ...fact('Round trip', 'rtt', el('span', { 'data-role': 'value', 'data-seconds': c.rtt_seconds ?? '' },
        c.connected && !lost ? formatLatency(c.rtt_seconds) : '—')),
      ...fact('Sent', 'sent', ...traffic(c.bytes_sent, r.sent)),
      ...fact('Received', 'received', ...traffic(c.bytes_received, r.recv)),
      ...fact('Mappings', 'mappings', el('span', { 'data-role': 'value', 'data-count': count }, intFormat.format(count))),
      // Only once a UDP session has gone through this client: before that there is no datagram link.
      ...(c.udp_transport && !lost
        ? fact('UDP', 'udp', el('span', { 'data-role': 'value', 'data-transport': c.udp_transport },
          UDP_TRANSPORTS[c.udp_transport] ?? c.udp_transport))
        : [])));
  }

  /** "Connected 12 min" and "Last active 3 s ago" move on between samples. */
  function renderClientClocks() {
    const now = serverNow();
    for (const node of dom.clientList.querySelectorAll('[data-role="ago"]')) {
      const ts = node.dataset.ts === '' ? null : Number(node.dataset.ts);
      node.textContent = node.dataset.kind === 'duration'
        ? formatDuration(now - ts)
        : formatAgo(ts == null ? null : now - ts);
    }
  }

  /** Tiny element builder: el('td', {class: 'num'}, 'text'). Text goes through
   * textContent, so a target host can never inject markup. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v != null) node.setAttribute(k, String(v));
    }
    for (const child of children) {
      if (child == null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function statusBadge(status, client) {
    const s = String(status || 'unknown');
    if (s === 'active') return el('span', { class: 'badge badge-ok' }, 'Active');
    if (s === 'waiting_for_tunnel') {
      return el('span', { class: 'badge badge-warn', title: client ? `client ${client} is not connected` : null }, 'Waiting for tunnel');
    }
    if (s.startsWith('error')) {
      const detail = s.replace(/^error:?\s*/, '');
      return el('span', { class: 'badge badge-bad', title: s }, detail ? `Error: ${detail}` : 'Error');
    }
    return el('span', { class: 'badge' }, s);
  }

  // A mapping's health (the API's `health`, judged over its last minutes):
  // badge text and colour. `ok` keeps the familiar "Active".
  const HEALTH = {
    ok: ['Active', 'badge-ok'],
    target_failing: ['Target failing', 'badge-bad'],
    blocked: ['Blocked (quota)', 'badge-bad'],
    refusing: ['Refusing', 'badge-warn'],
    waiting_for_tunnel: ['Waiting for tunnel', 'badge-warn'],
    down: ['Down', 'badge-bad'],
  };

  /** The status cell's badge: the mapping's health, its reason as the tooltip;
   * from a daemon without health, the listening status alone. */
  function healthBadge(m) {
    const known = HEALTH[m.health];
    if (!known) return statusBadge(m.status, m.client);
    if (String(m.status || '').startsWith('error')) {
      // Not serving at all (its port, a loop): the status says exactly why.
      const badge = statusBadge(m.status, m.client);
      badge.dataset.role = 'health';
      badge.dataset.health = m.health;
      if (m.health_reason) badge.title = m.health_reason;
      return badge;
    }
    const [text, cls] = known;
    const title = m.status && m.status !== 'active' ? `${m.health_reason || ''} (status: ${m.status})` : m.health_reason || null;
    return el('span', { class: `badge ${cls}`, 'data-role': 'health', 'data-health': m.health, title }, text);
  }

  /** Connect errors and refused visitors since the daemon started (the
   * counters behind the health), when there are any. */
  function problemsLine(m) {
    const parts = [];
    if (m.connect_errors) parts.push(`${intFormat.format(m.connect_errors)} connect error${m.connect_errors === 1 ? '' : 's'}`);
    const refused = Object.entries(m.refused || {}).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
    const total = refused.reduce((sum, [, n]) => sum + n, 0);
    if (total) parts.push(`${intFormat.format(total)} refused (${refused.map(([why, n]) => `${why} ${intFormat.format(n)}`).join(', ')})`);
    if (!parts.length) return null;
    return el('span', { class: 'cell-sub problems', 'data-role': 'problems', title: 'Since the daemon started' }, parts.join(' · '));
  }

  /** Since-start bytes, with the lifetime total under them (and, in the narrow
   * layout that hides the rate columns, the rate). */
  function bytesCell(label, col, bytes, lifetime, rate) {
    return el('td', { class: 'num', 'data-label': label, 'data-col': col, 'data-bytes': bytes, 'data-lifetime': lifetime ?? '' },
      el('span', { 'data-role': 'value' }, formatBytes(bytes)),
      el('span', { class: 'cell-sub rate-inline', 'data-role': 'rate' }, formatRate(rate)),
      lifetime == null ? null : el('span', { class: 'cell-sub', 'data-role': 'lifetime', title: 'Lifetime: since the mapping was created, across restarts' },
        `lifetime ${formatBytes(lifetime)}`));
  }

  function renderTable() {
    const maps = latest.mappings;
    dom.empty.hidden = maps.length > 0;
    dom.table.hidden = maps.length === 0; // column headings over nothing are noise
    dom.tableSub.textContent = maps.length === 1 ? '1 mapping' : `${maps.length} mappings`;
    const now = serverNow();
    // Rebuilt on each sample: a handful of rows every few seconds is cheap, and it
    // keeps rows exactly in the daemon's order (sorted by port) with no stale ones.
    const rows = maps.map((m) => {
      const r = rates.byMapping.get(`${m.port}/${m.protocol || 'tcp'}`) || {};
      const ago = m.last_update == null ? null : now - m.last_update;
      const udp = m.protocol === 'udp';
      return el('tr', { 'data-testid': 'mapping-row', 'data-port': m.port, 'data-protocol': m.protocol ?? 'tcp', 'data-status': m.status, 'data-health': m.health ?? '', 'data-client': m.client ?? '' },
        el('td', { class: 'port', 'data-label': 'Port', 'data-col': 'port' }, `:${m.port}`,
          // UDP 53 and TCP 53 are two mappings: the badge tells their rows apart.
          udp ? el('span', { class: 'badge badge-udp', 'data-role': 'protocol', title: 'UDP: datagrams; each visitor address is a session' }, 'UDP') : null),
        el('td', { class: 'target', 'data-label': 'Target', 'data-col': 'target', title: `${m.target_host}:${m.target_port}` },
          el('span', { 'data-role': 'value' }, `${m.target_host}:${m.target_port}`),
          m.description ? el('span', { class: 'mapping-description', 'data-role': 'description' }, m.description) : null,
          // Shown under the target when the table is narrow and the Mode column is not.
          el('span', { class: 'cell-sub mode-inline', title: m.client ? `via the tunnel of client ${m.client}` : null },
            m.use_tunnel ? 'via tunnel' : 'direct', groupOf(m) ? ` · ${groupOf(m).length} clients` : m.client ? clientRef(m.client, ' · ') : null)),
        el('td', { 'data-label': 'Mode', 'data-col': 'mode' },
          el('span', { class: `badge badge-mode ${m.use_tunnel ? 'badge-tunnel' : ''}`, 'data-role': 'value' }, m.use_tunnel ? 'Tunnel' : 'Direct'),
          groupOf(m) ? groupRef(m) : m.client ? el('span', { class: 'cell-sub' }, clientRef(m.client, 'client ')) : null),
        el('td', { 'data-label': 'Status', 'data-col': 'status' }, el('span', { 'data-role': 'value' }, healthBadge(m)), problemsLine(m), policyBadges(m)),
        bytesCell('Sent', 'sent', m.bytes_sent, m.lifetime_sent, r.sent),
        bytesCell('Received', 'received', m.bytes_received, m.lifetime_received, r.recv),
        el('td', { class: 'num col-rate', 'data-label': 'Rate ↑', 'data-col': 'rate-sent' }, formatRate(r.sent)),
        el('td', { class: 'num col-rate', 'data-label': 'Rate ↓', 'data-col': 'rate-received' }, formatRate(r.recv)),
        el('td', { class: 'num', 'data-label': udp ? 'Sessions' : 'Open', 'data-col': 'open' }, el('span', { 'data-role': 'value' }, openConnsButton(m)),
          udp ? el('span', { class: 'cell-sub', 'data-role': 'udp-sessions' }, (m.udp && m.udp.sessions) === 1 ? 'session' : 'sessions') : null,
          // Where the Connect column is folded away (721-1100 px), its values go here.
          m.connect_p50_seconds == null ? null : el('span', { class: 'cell-sub connect-inline', 'data-role': 'connect-inline', title: 'Connect time: median, 99th percentile (last 15 minutes)' },
            // A narrow column may break after "p50", never inside "1.3 ms".
            el('span', { class: 'connect-line' }, `p50 ${formatLatency(m.connect_p50_seconds).replace(' ', '\u00a0')}`),
            el('span', { class: 'connect-line' }, `p99 ${formatLatency(m.connect_p99_seconds).replace(' ', '\u00a0')}`))),
        el('td', { class: 'num col-connect', 'data-label': 'Connect p50 / p99', 'data-col': 'connect',
          'data-p50': m.connect_p50_seconds ?? '', 'data-p99': m.connect_p99_seconds ?? '',
          title: 'Time from accept to the target answering (through the tunnel: the client\'s dial included), median and 99th percentile of the last 15 minutes' },
        m.connect_p50_seconds == null ? '—' : `${formatLatency(m.connect_p50_seconds)} / ${formatLatency(m.connect_p99_seconds)}`),
        el('td', { class: 'num muted', 'data-label': 'Last active', 'data-col': 'last-activity', 'data-ts': m.last_update ?? '' },
          formatAgo(ago)));
    });
    dom.rows.replaceChildren(...withConnections(rows));
    // The Mappings card says how many are not ok, so a broken one is seen
    // without scrolling to the table.
    const attention = $('[data-role="attention"]', dom.cards.mappings);
    const unwell = maps.filter((m) => m.health && m.health !== 'ok');
    attention.hidden = unwell.length === 0;
    attention.dataset.count = String(unwell.length);
    attention.textContent = unwell.length === 1 ? `:${unwell[0].port} needs attention` : `${unwell.length} need attention`;
    policyState.mappings = new Map(maps.map((m) => [m.port, m]));
    maybeLoadEvents();
    if (typeof updatePortOptions === 'function') updatePortOptions(maps.map((m) => m.port));
  }

  /** A tunneled mapping's client: its name, linking to the client's card. */
  function clientRef(name, prefix) {
    return el('span', { class: 'client-ref' }, prefix,
      el('a', { href: `#client-${encodeURIComponent(name)}`, 'data-role': 'client' }, name));
  }

  /** A mapping's group when it names more than one client, else null. */
  function groupOf(m) {
    return Array.isArray(m.clients) && m.clients.length > 1 ? m.clients : null;
  }

  /** A group's clients under the Mode badge: each one linked to its card, those
   *  taking new visitors now marked, away ones struck through, and how visitors
   *  are shared. */
  function groupRef(m) {
    const members = new Map((m.members || []).map((c) => [c.client, c]));
    const names = groupOf(m).map((name) => {
      const c = members.get(name) || {};
      const state = c.serving ? 'serving' : c.connected ? (c.check_error ? 'failing' : 'standby') : 'away';
      const why = { serving: 'takes new visitors', standby: 'connected, standing by', failing: `health check fails: ${c.check_error}`, away: 'not connected' }[state];
      return el('a', { class: `group-member group-${state}`, href: `#client-${encodeURIComponent(name)}`, 'data-role': 'group-member',
        'data-client': name, 'data-state': state, title: `${name}: ${why}${c.active_connections ? ` · ${c.active_connections} open` : ''}` },
      state === 'serving' ? `● ${name}` : name);
    });
    const list = [];
    names.forEach((n, i) => list.push(...(i ? [', ', n] : [n])));
    return el('span', { class: 'cell-sub client-ref group-ref', 'data-role': 'group', 'data-balance': m.balance || '' },
      'clients ', ...list, el('span', { class: 'group-balance' }, ` · ${(m.balance || 'failover').replace('_', ' ')}`));
  }

  // ---------- Mapping policy ----------

  const policyState = { mappings: new Map(), eventsAt: 0, editing: null, original: null, opener: null };

  /** Cap, quota bar (used / allowance) and ACL badges, plus the edit link. */
  function policyBadges(m) {
    const parts = [];
    if (m.bandwidth_limit) {
      parts.push(el('span', { class: 'badge', 'data-role': 'cap', title: 'Bandwidth cap per direction, shared by all connections' },
        `cap ${formatRate(m.bandwidth_limit)}`));
    }
    if (m.quota) {
      const used = m.quota_used ?? 0;
      const ratio = m.quota.bytes > 0 ? used / m.quota.bytes : 0;
      const level = ratio >= 1 ? 'bad' : ratio >= 0.8 ? 'warn' : 'ok';
      const bar = el('span', { class: 'quota-bar' }, el('span', { style: `width: ${Math.min(100, ratio * 100).toFixed(1)}%` }));
      parts.push(el('span', { class: 'quota', 'data-role': 'quota', 'data-level': level, 'data-ratio': ratio.toFixed(4),
        title: `Quota per ${m.quota.period}, action ${m.quota.action}${m.quota_blocked ? ' — new visitors refused' : ''}` },
        bar, `${formatBytes(used)} / ${formatBytes(m.quota.bytes)} per ${m.quota.period}${m.quota_blocked ? ' · blocked' : ''}`));
    }
    const allow = m.allow || [];
    const deny = m.deny || [];
    if (allow.length || deny.length) {
      const title = [allow.length ? `allow ${allow.join(', ')}` : null, deny.length ? `deny ${deny.join(', ')}` : null].filter(Boolean).join('; ');
      parts.push(el('span', { class: 'badge badge-warn', 'data-role': 'acl', title }, `ACL ${allow.length ? `${allow.length} allowed` : ''}${allow.length && deny.length ? ', ' : ''}${deny.length ? `${deny.length} denied` : ''}`));
    }
    if (m.proxy_protocol) {
      parts.push(el('span', { class: 'badge', 'data-role': 'proxy-protocol',
        title: `Targets receive a PROXY protocol ${m.proxy_protocol} header with the visitor's address` },
        `PROXY ${m.proxy_protocol}`));
    }
    if (m.source === 'config') {
      // Declared in the server's config file: the API refuses changes, so no edit link.
      parts.push(el('span', { class: 'badge badge-mode', 'data-role': 'source', 'data-source': 'config',
        title: 'Declared in the server\'s config file ([[mappings]]): change it there and reload the service' }, 'config'));
    } else {
      parts.push(el('button', { type: 'button', class: 'link-button', 'data-role': 'edit-policy', 'data-port': m.port }, 'Edit policy'));
    }
    return el('div', { class: 'policy', 'data-testid': 'policy' }, ...parts);
  }

  const policyDom = {
    overlay: $('#policy'),
    form: $('#policy-form'),
    port: $('#policy-port'),
    description: $('#policy-description'),
    limit: $('#policy-limit'),
    limitUnit: $('#policy-limit-unit'),
    limitExact: $('#policy-limit-exact'),
    quotaBytes: $('#policy-quota-bytes'),
    quotaUnit: $('#policy-quota-unit'),
    quotaExact: $('#policy-quota-exact'),
    quotaPeriod: $('#policy-quota-period'),
    quotaAction: $('#policy-quota-action'),
    allow: $('#policy-allow'),
    deny: $('#policy-deny'),
    proxy: $('#policy-proxy'),
    error: $('#policy-error'),
    cancel: $('#policy-cancel'),
  };

  // Amounts are a number and a unit the operator picks. Whole bytes are
  // worked out in integers (BigInt), never through floating point, so the
  // field shows a stored value exactly and a value saved untouched is the
  // value stored: 300,000,000 B is "300 MB", and stays 300,000,000.
  const QUOTA_UNITS = [['B', 1n], ['KB', 10n ** 3n], ['MB', 10n ** 6n], ['GB', 10n ** 9n], ['TB', 10n ** 12n],
    ['KiB', 2n ** 10n], ['MiB', 2n ** 20n], ['GiB', 2n ** 30n], ['TiB', 2n ** 40n]];
  // Network people count bits: 1 Mbit/s is 125,000 bytes/s, exactly.
  const CAP_UNITS = [['B/s', 1n], ['KB/s', 10n ** 3n], ['MB/s', 10n ** 6n], ['GB/s', 10n ** 9n],
    ['KiB/s', 2n ** 10n], ['MiB/s', 2n ** 20n], ['GiB/s', 2n ** 30n],
    ['kbit/s', 125n], ['Mbit/s', 125n * 10n ** 3n], ['Gbit/s', 125n * 10n ** 6n]];
  const amountFields = {
    cap: { input: policyDom.limit, unit: policyDom.limitUnit, exact: policyDom.limitExact, units: CAP_UNITS,
      fallback: 'Mbit/s', per: 'bytes/s', none: 'no cap' },
    quota: { input: policyDom.quotaBytes, unit: policyDom.quotaUnit, exact: policyDom.quotaExact, units: QUOTA_UNITS,
      fallback: 'GB', per: 'bytes', none: 'no quota' },
  };
  for (const field of Object.values(amountFields)) {
    field.unit.replaceChildren(...field.units.map(([name]) => el('option', { value: name }, name)));
    field.input.addEventListener('input', () => showExact(field));
    field.unit.addEventListener('change', () => showExact(field));
  }

  /** `bytes / factor` as a decimal string, or null if it needs more than 12 decimals. */
  function exactDecimal(bytes, factor) {
    let rest = bytes % factor;
    let decimals = '';
    while (rest > 0n && decimals.length < 12) {
      rest *= 10n;
      decimals += String(rest / factor);
      rest %= factor;
    }
    if (rest > 0n) return null;
    return decimals ? `${bytes / factor}.${decimals}` : String(bytes / factor);
  }

  /** The unit in which `bytes` reads shortest exactly (at least 1 of it; ties: the larger unit). */
  function naturalUnit(bytes, units) {
    let best = null;
    for (const [name, factor] of units) {
      const text = exactDecimal(bytes, factor);
      if (text === null) continue;
      const digits = text.replace('.', '').replace(/^0+/, '').replace(/0+$/, '').length;
      const score = [bytes < factor ? 1 : 0, digits, -Number(factor)];
      const first = best ? score.findIndex((v, i) => v !== best.score[i]) : -1;
      if (!best || (first >= 0 && score[first] < best.score[first])) best = { name, text, score };
    }
    return best;
  }

  /** Shows `bytes` (a BigInt, or null for none) in the field, exactly. */
  function setAmount(field, bytes) {
    const shown = bytes === null ? null : naturalUnit(bytes, field.units);
    field.input.value = shown ? shown.text : '';
    field.unit.value = shown ? shown.name : field.fallback;
    showExact(field);
  }

  /** The field's whole bytes (nearest, halves up): a BigInt, null when empty, or an Error. */
  function readAmount(field) {
    const text = field.input.value.trim();
    if (text === '') return null;
    const number = /^(\d*)(?:\.(\d*))?$/.exec(text);
    if (!number || (number[1] + (number[2] || '')) === '') return new Error(`“${text}” is not a number (like 300 or 1.5)`);
    const decimals = number[2] || '';
    const scale = 10n ** BigInt(decimals.length);
    const factor = field.units.find(([name]) => name === field.unit.value)[1];
    const bytes = (BigInt((number[1] || '0') + decimals) * factor * 2n + scale) / (2n * scale);
    if (bytes < 1n) return new Error(`${text} ${field.unit.value} is less than 1 byte; leave the field empty for ${field.none}`);
    if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) return new Error(`${text} ${field.unit.value} is too large`);
    return bytes;
  }

  /** The exact bytes under the field, so what is saved is never a surprise. */
  function showExact(field) {
    const bytes = readAmount(field);
    const invalid = bytes instanceof Error;
    field.exact.toggleAttribute('data-invalid', invalid);
    field.exact.dataset.bytes = typeof bytes === 'bigint' ? String(bytes) : '';
    field.exact.textContent = invalid ? bytes.message : bytes === null ? field.none : `= ${intFormat.format(bytes)} ${field.per}`;
  }

  function openPolicy(port, opener) {
    const m = policyState.mappings.get(port);
    if (!m) return;
    policyState.editing = port;
    // Compared with at save: a field left as it was shown is not sent, even if
    // the mapping changed meanwhile by other hands.
    policyState.original = m;
    policyState.opener = opener || null;
    policyDom.port.textContent = String(port);
    policyDom.description.value = m.description || '';
    setAmount(amountFields.cap, m.bandwidth_limit ? BigInt(m.bandwidth_limit) : null);
    setAmount(amountFields.quota, m.quota ? BigInt(m.quota.bytes) : null);
    policyDom.quotaPeriod.value = m.quota ? m.quota.period : 'month';
    policyDom.quotaAction.value = m.quota ? m.quota.action : 'alert';
    policyDom.allow.value = (m.allow || []).join('\n');
    policyDom.deny.value = (m.deny || []).join('\n');
    policyDom.proxy.value = m.proxy_protocol || '';
    policyDom.error.hidden = true;
    policyDom.overlay.hidden = false;
    policyDom.description.focus();
  }

  function closePolicy() {
    policyState.editing = null;
    policyDom.overlay.hidden = true;
    if (policyState.opener && policyState.opener.isConnected) policyState.opener.focus();
    policyState.opener = null;
  }

  function lines(text) {
    return text.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
  }

  /** Only the fields whose value the operator changed: an untouched field is
   * not sent, so it cannot change (nor re-announce anything). */
  function policyChanges(m) {
    const changes = {};
    const description = policyDom.description.value.trim();
    if (description !== (m.description || '')) changes.description = description || null;
    const cap = readAmount(amountFields.cap);
    if (cap instanceof Error) throw cap;
    if (cap !== (m.bandwidth_limit ? BigInt(m.bandwidth_limit) : null)) changes.bandwidth_limit = cap === null ? null : Number(cap);
    const bytes = readAmount(amountFields.quota);
    if (bytes instanceof Error) throw bytes;
    const quota = bytes === null ? null : { bytes: Number(bytes), period: policyDom.quotaPeriod.value, action: policyDom.quotaAction.value };
    const was = m.quota || null;
    if (!quota !== !was || (quota && (quota.bytes !== was.bytes || quota.period !== was.period || quota.action !== was.action))) {
      changes.quota = quota;
    }
    for (const key of ['allow', 'deny']) {
      const list = lines(policyDom[key].value);
      if (list.join('\n') !== (m[key] || []).join('\n')) changes[key] = list;
    }
    const proxy = policyDom.proxy.value || null;
    if (proxy !== (m.proxy_protocol || null)) changes.proxy_protocol = proxy;
    return changes;
  }

  async function savePolicy(event) {
    event.preventDefault();
    const port = policyState.editing;
    if (port == null) return;
    let changes;
    try {
      changes = policyChanges(policyState.original);
    } catch (e) {
      policyDom.error.textContent = e.message;
      policyDom.error.hidden = false;
      return;
    }
    if (Object.keys(changes).length === 0) {
      closePolicy();
      return;
    }
    const body = { port, ...changes };
    const res = await fetch('/api/mapping/update', {
      method: 'POST',
      headers: { ...authHeaders(), 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
      cache: 'no-store',
    }).catch((e) => ({ ok: false, status: 0, json: async () => ({ message: String(e) }) }));
    if (res.status === 401) {
      closePolicy();
      needToken();
      return;
    }
    const reply = await res.json().catch(() => null);
    if (!res.ok || !reply || reply.success === false) {
      policyDom.error.textContent = (reply && reply.message) || `HTTP ${res.status}`;
      policyDom.error.hidden = false;
      return;
    }
    policyState.mappings.set(port, { ...policyState.mappings.get(port), ...reply.data });
    closePolicy();
    fetchTraffic().then(ingest).catch(() => {});
  }

  policyDom.form.addEventListener('submit', savePolicy);
  policyDom.cancel.addEventListener('click', closePolicy);
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && !policyDom.overlay.hidden) {
      e.preventDefault();
      closePolicy();
    }
  });
  dom.rows.addEventListener('click', (e) => {
    const button = e.target.closest('[data-role="edit-policy"]');
    if (button) openPolicy(Number(button.dataset.port), button);
  });

  const eventsDom = { list: $('#event-list'), empty: $('#events-empty') };

  /** Refreshes the events list at most every 5 s, riding on the traffic updates. */
  function maybeLoadEvents() {
    const now = Date.now();
    if (now - policyState.eventsAt < 5000) return;
    policyState.eventsAt = now;
    fetchApi('/api/events?limit=50').then((data) => {
      const events = data.events || [];
      eventsDom.empty.hidden = events.length > 0;
      eventsDom.list.replaceChildren(...events.map((ev) => el('li', { 'data-testid': 'event', 'data-kind': ev.kind, 'data-port': ev.port ?? '' },
        el('time', { datetime: new Date(ev.time * 1000).toISOString() }, new Date(ev.time * 1000).toLocaleString()),
        el('span', { class: `badge ${ev.kind.startsWith('quota_ex') || ev.kind.endsWith('_down') || ev.kind.endsWith('_lost') ? 'badge-bad' : ev.kind === 'quota_warning' ? 'badge-warn' : 'badge-ok'}` }, ev.kind.replace(/_/g, ' ')),
        el('span', { class: 'event-message' }, ev.message))));
    }).catch(() => {});
  }

  // "Updated 2 s ago" and the "last activity" cells move on between samples.
  function renderClock() {
    if (!latest) return;
    const now = serverNow();
    dom.updated.textContent = `Updated ${formatAgo((performance.now() - latestAt) / 1000)}`;
    for (const cell of dom.rows.querySelectorAll('[data-col="last-activity"]')) {
      const ts = cell.dataset.ts;
      cell.textContent = formatAgo(ts === '' ? null : now - Number(ts));
    }
    if (latest.tunnel.connected && latest.tunnel.connected_since) renderTunnel();
    renderClientClocks();
    renderChart(); // the time axis moves on, also while no samples arrive
  }
  setInterval(renderClock, 1000);

  // ---------- chart ----------

  let chart = null;

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function chartColors() {
    return { sent: cssVar('--sent'), recv: cssVar('--recv'), grid: cssVar('--grid'), muted: cssVar('--muted') };
  }

  /** "#4f46e5" + 0.12 -> "rgba(79, 70, 229, 0.12)" for the fill under a line.
   * (Chart.js parses colours itself and does not understand color-mix().) */
  function withAlpha(hex, alpha) {
    const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex);
    if (!m) return hex;
    const [r, g, b] = m.slice(1).map((h) => Number.parseInt(h, 16));
    return `rgba(${r}, ${g}, ${b}, ${alpha})`;
  }

  function createChart() {
    // Without the vendored library the rest of the page still works; the chart box
    // says why it is empty instead of throwing.
    if (typeof window.Chart !== 'function') {
      $('#chart-empty').textContent = 'Chart library failed to load';
      return;
    }
    const col = chartColors();
    // Which scheme the chart was drawn for (tests wait on it after a theme switch).
    dom.chartBox.dataset.theme = window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
    // Same type as the rest of the page (the canvas does not inherit CSS fonts).
    window.Chart.defaults.font.family = cssVar('--font');
    // Samples and minute averages are separate datasets: the minute steps are
    // dashed and paler, so a glance tells a minute's average from a 3 s sample.
    const dataset = (label, color, kind) => ({
      label,
      kind,
      data: [],
      borderColor: color,
      backgroundColor: withAlpha(color, kind === 'minute' ? 0.08 : 0.14),
      borderDash: kind === 'minute' ? [5, 3] : [],
      fill: 'origin',
      tension: 0, // straight steps: a measurement is flat over the time it covers
      borderWidth: kind === 'minute' ? 1.5 : 2,
      spanGaps: false, // a null point is a time nobody measured: draw nothing there
      pointRadius: 0, // two points per step: dots would be noise
      pointHoverRadius: 0,
      pointHitRadius: 6,
    });
    chart = new window.Chart(dom.canvas, {
      type: 'line',
      data: {
        datasets: [
          dataset('Sent', col.sent, 'sample'),
          dataset('Received', col.recv, 'sample'),
          dataset('Sent (minute average)', col.sent, 'minute'),
          dataset('Received (minute average)', col.recv, 'minute'),
        ],
      },
      plugins: [gapBands],
      options: {
        responsive: true,
        maintainAspectRatio: false,
        // Updates arrive every few seconds; animating each one only adds motion.
        animation: false,
        interaction: { mode: 'nearest', axis: 'x', intersect: false },
        plugins: {
          legend: { display: false }, // the panel header has its own legend with live values
          tooltip: {
            callbacks: {
              // One step: when it covers, what it is, both directions.
              title: (items) => {
                const seg = items.length && items[0].raw && items[0].raw.seg;
                if (!seg) return '';
                const what = seg.kind === 'minute' ? 'minute average' : `${Math.round(seg.to - seg.from)} s sample`;
                return `${formatClock(seg.from)} – ${formatClock(seg.to)} · ${what}`;
              },
              label: (ctx) => {
                const seg = ctx.raw && ctx.raw.seg;
                return seg ? [` Sent: ${formatRate(seg.sent)}`, ` Received: ${formatRate(seg.recv)}`] : '';
              },
            },
          },
        },
        scales: {
          // A real time axis (Unix seconds): steps sit where they were measured,
          // so an outage is as wide as it lasted.
          x: {
            type: 'linear',
            grid: { display: false },
            border: { color: col.grid },
            // Ticks on round local minutes, as many as fit (see clockTicks).
            afterBuildTicks: (scale) => { scale.ticks = clockTicks(scale.min, scale.max, scale.width || dom.canvas.clientWidth); },
            ticks: { color: col.muted, maxRotation: 0, autoSkip: false, callback: (v) => formatAxisClock(v) },
          },
          y: {
            beginAtZero: true,
            grid: { color: col.grid },
            border: { display: false },
            suggestedMax: 1024,
            ticks: { color: col.muted, stepSize: niceStep(0), callback: (v) => formatTick(v) },
          },
        },
      },
    });
  }

  /** Shades each gap (no measurement: the daemon or the page was away) and says
   * so, so it cannot be mistaken for a quiet time at zero. */
  const gapBands = {
    id: 'gapBands',
    beforeDatasetsDraw(c) {
      const gaps = c.$gaps || [];
      const { ctx, chartArea: area, scales: { x } } = c;
      if (!gaps.length || !area) return;
      ctx.save();
      ctx.fillStyle = cssVar('--grid');
      ctx.globalAlpha = 0.55;
      ctx.font = `11px ${cssVar('--font')}`;
      ctx.textAlign = 'center';
      for (const g of gaps) {
        const left = Math.max(area.left, x.getPixelForValue(g.from));
        const right = Math.min(area.right, x.getPixelForValue(g.to));
        if (right - left < 1) continue;
        ctx.globalAlpha = 0.55;
        ctx.fillStyle = cssVar('--grid');
        ctx.fillRect(left, area.top, right - left, area.bottom - area.top);
        if (right - left > 44) {
          ctx.globalAlpha = 1;
          ctx.fillStyle = cssVar('--muted');
          ctx.fillText('no data', (left + right) / 2, area.top + 14);
        }
      }
      ctx.restore();
    },
  };

  // On a theme switch the chart is rebuilt from the same history arrays: Chart.js
  // caches resolved per-point colours, so patching options leaves stale dots.
  function applyChartTheme() {
    if (!chart) return;
    chart.destroy();
    createChart();
    renderChart();
    if (hist.chart) {
      const { labels, datasets } = hist.chart.data;
      const data = datasets.map((d) => d.data);
      hist.chart.destroy();
      createHistoryChart();
      hist.chart.data.labels = labels;
      hist.chart.data.datasets.forEach((d, i) => { d.data = data[i]; });
      fitHistoryAxis();
    }
  }

  /** A y-axis step that gives 4-6 round ticks in binary units (1, 2, 2.5, 5 x 10^n
   * KiB/s, ...), instead of Chart.js's decimal steps that read "9.54 MiB/s". */
  function niceStep(max) {
    if (!(max > 0)) return 256; // an idle chart still gets a sensible 0-1 KiB/s axis
    let unit = 1;
    while (max / unit >= 1024 && unit < 1024 ** 4) unit *= 1024;
    const raw = max / unit / 5;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((v) => v >= raw);
    return Math.max(step * unit, 1);
  }

  /** Axis labels drop trailing zeros: "2.50 MiB/s" -> "2.5 MiB/s", "2.00" -> "2". */
  function trimZeros(label) {
    return label.replace(/(\.\d*?)0+ /, '$1 ').replace('. ', ' ');
  }

  function formatTick(v) {
    return trimZeros(formatRate(v));
  }

  function formatAxisClock(unixSecs) {
    return new Date(unixSecs * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  // Tick spacings of the live chart's time axis (seconds): round minutes.
  const CLOCK_STEPS = [60, 120, 300, 600, 900, 1800, 3600];

  /** Ticks on round local times between `min` and `max`: the finest spacing of
   * CLOCK_STEPS that leaves about 70 px per label. */
  function clockTicks(min, max, width) {
    if (!(max > min)) return [];
    const fit = Math.max(2, Math.floor((width || 600) / 70));
    const step = CLOCK_STEPS.find((s) => (max - min) / s <= fit) || 3600;
    // Seconds east of UTC in the browser's zone: "round" is round on its clock.
    const east = -new Date(min * 1000).getTimezoneOffset() * 60;
    const ticks = [];
    for (let t = Math.ceil((min + east) / step) * step - east; t <= max; t += step) ticks.push({ value: t });
    return ticks;
  }

  /** The charted series' current rates (the legend beside the chart). */
  function chartedRates() {
    if (live.port == null) return { sent: rates.sent, recv: rates.recv };
    return rates.byPort.get(live.port) || { sent: null, recv: null };
  }

  /** The charted series as steps, oldest first: {from, to, sent, recv, kind}.
   * Minute steps end where the first sample step begins: no time twice. */
  function chartSteps() {
    const samples = [];
    for (const p of live.points) {
      const r = live.port == null ? p : p.ports && p.ports.get(live.port);
      if (!r || r.sent == null || r.recv == null) continue; // not measured: a gap
      samples.push({ from: p.x - p.span, to: p.x, sent: r.sent, recv: r.recv, kind: 'sample' });
    }
    const firstSample = samples.length ? samples[0].from : Infinity;
    const minutes = live.minutes
      .filter((m) => m.from < firstSample)
      .map((m) => ({ ...m, to: Math.min(m.to, firstSample), kind: 'minute' }));
    return [...minutes, ...samples];
  }

  /** Where consecutive steps do not touch, nothing was measured: a gap. From a
   * minute to the samples the tolerance is one recorder interval (the minute in
   * progress may be too young to draw, see loadMinuteHistory), unless the daemon
   * was known to be down in between. */
  function chartGaps(steps) {
    const gaps = [];
    for (let i = 1; i < steps.length; i += 1) {
      const a = steps[i - 1];
      const b = steps[i];
      const slack = a.kind === b.kind ? 0.5 : live.historyInterval + 1;
      const down = live.holes.some((h) => h.from < b.from && h.to > a.to);
      if (b.from - a.to > (down ? 0.5 : slack)) gaps.push({ from: a.to, to: b.from });
    }
    return gaps;
  }

  /** One dataset's points: each step as a flat line from its start to its end,
   * a null between steps that do not touch (Chart.js breaks the line there). */
  function stepLine(steps, key) {
    const out = [];
    let end = null;
    for (const seg of steps) {
      if (end != null && seg.from - end > 0.5) out.push({ x: (end + seg.from) / 2, y: null });
      out.push({ x: seg.from, y: seg[key], seg }, { x: seg.to, y: seg[key], seg });
      end = seg.to;
    }
    return out;
  }

  /** What the live chart drew last (window.tunneldCharts.live()). */
  let drawnLive = { port: null, steps: [], gaps: [], min: null, max: null };

  function renderChart() {
    const steps = chartSteps();
    const gaps = chartGaps(steps);
    dom.chartBox.dataset.points = String(steps.length);
    dom.chartBox.dataset.gaps = String(gaps.length);
    dom.chartBox.dataset.port = live.port == null ? '' : String(live.port);
    const now = serverNow();
    // Up to 30 minutes; while less is known (a fresh daemon), just what is known,
    // but at least 5 minutes, so a new page is not one spike at the right edge.
    const oldest = steps.length ? steps[0].from : now;
    const min = Math.max(now - LIVE_WINDOW_SECS, Math.min(oldest, now - MIN_WINDOW_SECS));
    drawnLive = { port: live.port, steps, gaps, min, max: now };
    if (!chart) return;
    const samples = steps.filter((seg) => seg.kind === 'sample');
    const minutes = steps.filter((seg) => seg.kind === 'minute');
    chart.data.datasets[0].data = stepLine(samples, 'sent');
    chart.data.datasets[1].data = stepLine(samples, 'recv');
    chart.data.datasets[2].data = stepLine(minutes, 'sent');
    chart.data.datasets[3].data = stepLine(minutes, 'recv');
    chart.$gaps = gaps;
    chart.options.scales.x.min = min;
    chart.options.scales.x.max = now;
    const visible = steps.filter((seg) => seg.to >= min);
    const max = Math.max(0, ...visible.map((seg) => Math.max(seg.sent, seg.recv)));
    const y = chart.options.scales.y;
    y.ticks.stepSize = niceStep(max);
    y.suggestedMax = max > 0 ? undefined : 1024;
    chart.update('none');
  }

  // ---------- which series the chart shows ----------

  const chartPicker = { select: $('#chart-port'), all: $('#chart-all'), name: $('#chart-series-name') };

  /** A mapping as the pickers name it: port, target and description. */
  function mappingLabel(port) {
    const m = latest && latest.mappings.find((x) => x.port === port);
    if (!m) return `:${port}`;
    const text = `:${port} → ${m.target_host}:${m.target_port}${m.description ? ` — ${m.description}` : ''}`;
    return text.length > 80 ? `${text.slice(0, 79)}…` : text;
  }

  /** Fills a mapping picker ("All mappings" first) with `ports`, keeping its choice. */
  function fillMappingPicker(select, ports) {
    const labels = [...new Set(ports)].sort((a, b) => a - b).map((p) => [p, mappingLabel(p)]);
    const key = JSON.stringify(labels);
    if (select.dataset.options === key) return;
    select.dataset.options = key;
    const chosen = select.value;
    select.replaceChildren(el('option', { value: '' }, 'All mappings'), ...labels.map(([p, label]) => el('option', { value: p }, label)));
    select.value = chosen;
  }

  /** Charts one mapping alone (`port`), or all of them (null): its samples since
   * the page loaded and its own minute history. */
  function chartMapping(port) {
    live.port = port;
    live.minutes = []; // the previous series' minutes are not this one's
    live.holes = [];
    live.historyPoints = 0;
    dom.chartBox.dataset.historyPoints = '0';
    const ports = latest ? latest.mappings.map((m) => m.port) : [];
    fillMappingPicker(chartPicker.select, port == null ? ports : [...ports, port]);
    chartPicker.select.value = port == null ? '' : String(port);
    chartPicker.all.hidden = port == null;
    chartPicker.name.textContent = port == null ? '· all mappings' : `· ${mappingLabel(port)}`;
    markChartedRow();
    loadMinuteHistory();
    render();
    renderChart();
  }

  /** Highlights the row of the charted mapping (rows are rebuilt every sample). */
  function markChartedRow() {
    const ports = latest ? latest.mappings.map((m) => m.port) : [];
    fillMappingPicker(chartPicker.select, live.port == null ? ports : [...ports, live.port]);
    for (const row of dom.rows.querySelectorAll('tr[data-port]')) {
      const on = live.port != null && Number(row.dataset.port) === live.port;
      row.classList.toggle('is-charted', on);
      if (on) row.setAttribute('aria-current', 'true');
      else row.removeAttribute('aria-current');
    }
  }

  // A click on a mapping row (not on its buttons or links) charts that mapping;
  // a second click on it goes back to all.
  dom.rows.addEventListener('click', (e) => {
    if (e.target.closest('button, a, input, select, textarea, label')) return;
    const row = e.target.closest('tr[data-port]');
    if (!row) return;
    const port = Number(row.dataset.port);
    chartMapping(live.port === port ? null : port);
  });
  chartPicker.select.addEventListener('change', () => chartMapping(chartPicker.select.value === '' ? null : Number(chartPicker.select.value)));
  chartPicker.all.addEventListener('click', () => chartMapping(null));

  // ---------- Live connections of a mapping ----------

  // The Open cell of a mapping row is a button that opens a row under it with
  // that mapping's open connections, refreshed every CONNS_REFRESH_MS, each
  // with a Close button (POST /api/connection/close: the visitor gets a reset).
  const CONNS_REFRESH_MS = 2000;
  const CONNS_LIMIT = 50;
  const conns = { port: null, data: null, error: null, timer: null, row: null, request: 0 };

  function openConnsButton(m) {
    const open = conns.port === m.port;
    return el('button', {
      type: 'button', class: 'conns-toggle', 'data-role': 'open-conns', 'data-port': m.port,
      'aria-expanded': String(open),
      title: m.protocol === 'udp' ? (open ? 'Hide the open UDP sessions' : 'Show the open UDP sessions (one per visitor address)')
        : open ? 'Hide the open connections' : 'Show the open connections',
    }, intFormat.format(m.active_connections ?? 0));
  }

  /** The table's rows with the open connections' row under the opened mapping. */
  function withConnections(rows) {
    if (conns.port == null) return rows;
    const i = rows.findIndex((r) => Number(r.dataset.port) === conns.port);
    if (i < 0) {
      hideConns(); // the mapping is gone
      return rows;
    }
    if (!conns.row) conns.row = el('tr', { class: 'conns-row', 'data-testid': 'conns-row' }, el('td', {}));
    conns.row.firstChild.colSpan = rows[i].children.length;
    conns.row.dataset.connsPort = conns.port;
    return [...rows.slice(0, i + 1), conns.row, ...rows.slice(i + 1)];
  }

  function showConns(port) {
    conns.port = port;
    conns.data = null;
    conns.error = null;
    conns.row = null;
    if (latest) renderTable();
    renderConns();
    loadConns();
  }

  function hideConns() {
    conns.port = null;
    conns.data = null;
    conns.row = null;
    clearTimeout(conns.timer);
    if (latest) renderTable();
  }

  async function loadConns() {
    clearTimeout(conns.timer);
    const port = conns.port;
    if (port == null) return;
    const request = ++conns.request;
    try {
      const data = await fetchApi(`/api/connections?port=${port}&limit=${CONNS_LIMIT}`);
      if (request !== conns.request || conns.port !== port) return;
      conns.data = data;
      conns.error = null;
    } catch (err) {
      if (request !== conns.request) return;
      if (err instanceof AuthError) return needToken();
      conns.error = err.message;
    }
    renderConns();
    conns.timer = setTimeout(loadConns, CONNS_REFRESH_MS);
  }

  function renderConns() {
    if (!conns.row) return;
    const port = conns.port;
    const data = conns.data;
    const now = serverNow();
    const list = data ? data.connections.map((c) => el('li', { 'data-testid': 'conn', 'data-id': c.id, 'data-source': c.source },
      el('span', { class: 'conn-source' }, c.source),
      el('span', { class: 'conn-meta' }, c.client ? `via ${c.client} · ` : '', `${formatDuration(Math.max(0, now - c.started_at))}`),
      el('span', { class: 'conn-bytes', 'data-role': 'conn-sent', 'data-bytes': c.bytes_sent, title: 'Sent: visitor → target' },
        `↑ ${formatBytes(c.bytes_sent)}`, el('span', { class: 'cell-sub' }, formatRate(c.sent_rate))),
      el('span', { class: 'conn-bytes', 'data-role': 'conn-received', 'data-bytes': c.bytes_received, title: 'Received: target → visitor' },
        `↓ ${formatBytes(c.bytes_received)}`, el('span', { class: 'cell-sub' }, formatRate(c.received_rate))),
      el('button', { type: 'button', class: 'button button-small button-quiet', 'data-role': 'close-conn', 'data-id': c.id,
        title: `Reset this connection (the visitor ${c.source} gets a reset)` }, 'Close'))) : [];
    const count = data ? data.count : 0;
    const sub = conns.error ? `unavailable: ${conns.error}`
      : !data ? 'loading…'
      : `${intFormat.format(count)} open${count > data.connections.length ? `, ${data.connections.length} shown` : ''} · rates over ${data.rate_window_secs} s`;
    conns.row.firstChild.replaceChildren(el('div', { class: 'conns-panel', 'data-testid': 'conns-panel', 'data-port': port, 'data-count': count },
      el('div', { class: 'conns-head' },
        el('strong', {}, `Open connections of :${port}`),
        el('span', { class: 'panel-sub', 'data-role': 'conns-sub' }, sub),
        el('button', { type: 'button', class: 'link-button', 'data-role': 'hide-conns' }, 'Hide')),
      list.length ? el('ul', { class: 'conns-list', 'data-testid': 'conns-list' }, ...list)
        : el('p', { class: 'empty-text', 'data-testid': 'conns-empty' }, data ? 'No open connections.' : '')));
  }

  async function closeConnection(button) {
    button.disabled = true;
    const id = Number(button.dataset.id);
    const res = await fetch('/api/connection/close', {
      method: 'POST',
      headers: { ...authHeaders(), 'Content-Type': 'application/json' },
      body: JSON.stringify({ id }),
      cache: 'no-store',
    }).catch((e) => ({ ok: false, status: 0, json: async () => ({ message: String(e) }) }));
    if (res.status === 401) return needToken();
    const reply = await res.json().catch(() => null);
    if (!res.ok && res.status !== 404) {
      conns.error = (reply && reply.message) || `HTTP ${res.status}`;
    }
    loadConns();
  }

  dom.rows.addEventListener('click', (e) => {
    const toggle = e.target.closest('[data-role="open-conns"]');
    if (toggle) {
      const port = Number(toggle.dataset.port);
      return conns.port === port ? hideConns() : showConns(port);
    }
    if (e.target.closest('[data-role="hide-conns"]')) return hideConns();
    const close = e.target.closest('[data-role="close-conn"]');
    if (close) closeConnection(close);
  });

  // ---------- connection state ----------

  const STATE_TEXT = {
    connecting: 'Connecting…',
    live: 'Live',
    polling: 'Polling',
    lost: 'Connection lost',
    'auth-required': 'Token required',
  };

  function setState(next, detail) {
    document.body.dataset.state = next;
    dom.status.dataset.state = next;
    dom.statusText.textContent = STATE_TEXT[next];
    dom.status.title = detail || '';
    dom.banner.hidden = next !== 'lost';
    if (next === 'lost') dom.bannerText.textContent = detail || 'Connection to the daemon lost — retrying…';
    dom.auth.hidden = next !== 'auth-required';
    renderTunnel();
    renderClients();
    const every = intervalMs >= 1000 ? `${intervalMs / 1000} s` : `${intervalMs} ms`;
    dom.footerMode.textContent = next === 'polling'
      ? `polling every ${every} (server push unavailable)`
      : `updates by server push every ${every}`;
  }

  /** Thrown for 401s so every path can send the user to the token prompt. */
  class AuthError extends Error {}

  function authHeaders() {
    const token = loadToken();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  /** The envelope's `data` of a GET under /api, with the token. */
  async function fetchApi(path) {
    const res = await fetch(path, { headers: authHeaders(), cache: 'no-store' });
    if (res.status === 401) throw new AuthError();
    const body = await res.json().catch(() => null);
    if (!res.ok || !body || body.success === false || !body.data) {
      throw new Error((body && body.message) || `HTTP ${res.status}`);
    }
    return body.data;
  }

  /** One snapshot from /api/stats/traffic. */
  function fetchTraffic() {
    return fetchApi('/api/stats/traffic');
  }

  // /health tells whether a tunnel listener exists at all ("disabled" vs "waiting").
  // It is not under /api, needs no token, and failing it only loses that nuance.
  let tunnelEnabled = null;
  async function fetchHealth() {
    try {
      const res = await fetch('/health', { cache: 'no-store' });
      if (res.ok) tunnelEnabled = (await res.json()).tunnel_enabled !== false;
    } catch { /* keep unknown */ }
  }

  // The connection manager. Exactly one of these runs at a time:
  //   stream   - EventSource open (state live once data arrives)
  //   poll     - timer fetching /api/stats/traffic (state polling), with a stream retry
  //   recover  - daemon unreachable: back-off timer probing /api/stats/traffic (state lost)
  // A 401 anywhere stops everything and shows the token prompt.
  let source = null;
  let streamLive = false; // the open stream has delivered data
  let pollTimer = null;
  let streamRetryTimer = null;
  let recoverTimer = null;
  let watchdog = null;
  let backoffMs = 1000;
  let generation = 0; // bumps on every restart so late callbacks of an old attempt are ignored

  function stopAll() {
    generation += 1;
    if (source) source.close();
    source = null;
    streamLive = false;
    clearTimeout(pollTimer);
    clearTimeout(streamRetryTimer);
    clearTimeout(recoverTimer);
    clearTimeout(watchdog);
  }

  function streamUrl() {
    const q = new URLSearchParams();
    if (passInterval) q.set('interval_ms', String(intervalMs));
    // EventSource cannot send an Authorization header; the daemon accepts ?token=.
    const token = loadToken();
    if (token) q.set('token', token);
    const query = q.toString();
    return '/api/stats/stream' + (query ? `?${query}` : '');
  }

  function openStream() {
    if (source) source.close();
    const gen = generation;
    const es = new EventSource(streamUrl());
    source = es;
    streamLive = false;
    let delivered = false;
    armWatchdog(gen);
    es.addEventListener('traffic', (ev) => {
      if (gen !== generation) return;
      let sample;
      try { sample = JSON.parse(ev.data); } catch { return; }
      // The stream is back: polling (if it was running) is no longer needed.
      clearTimeout(pollTimer);
      clearTimeout(streamRetryTimer);
      delivered = true;
      streamLive = true;
      backoffMs = 1000;
      setState('live');
      ingest(sample);
      armWatchdog(gen);
    });
    es.addEventListener('error', () => {
      if (gen !== generation || source !== es) return;
      // EventSource reports neither the HTTP status nor why; close it and let a
      // plain fetch find out (401? daemon down? stream route missing?). A stream
      // that had been working (dropped by a proxy, say) is retried at once; one that
      // never delivered is left alone for a while and the page polls meanwhile.
      es.close();
      source = null;
      streamLive = false;
      clearTimeout(watchdog);
      probe(gen, delivered ? 0 : SSE_RETRY_MS);
    });
  }

  // A stream that stays open but goes silent (a stalled proxy, a hung daemon) fires
  // no error event; treat several missed intervals as a failure.
  function armWatchdog(gen) {
    clearTimeout(watchdog);
    watchdog = setTimeout(() => {
      if (gen !== generation || !source) return;
      source.close();
      source = null;
      streamLive = false;
      probe(gen, SSE_RETRY_MS);
    }, intervalMs * 3 + 5000);
  }

  /** After a stream failure: is the daemon there at all, and does it want a token?
   * Reachable means polling, with the stream retried after `streamRetryMs`. */
  async function probe(gen, streamRetryMs) {
    try {
      const sample = await fetchTraffic();
      if (gen !== generation) return;
      backoffMs = 1000;
      ingest(sample);
      startPolling(gen, streamRetryMs);
    } catch (err) {
      if (gen !== generation) return;
      if (err instanceof AuthError) return needToken();
      scheduleRecover(gen, err);
    }
  }

  function startPolling(gen, streamRetryMs) {
    setState('polling');
    clearTimeout(pollTimer);
    pollTimer = setTimeout(async function tick() {
      try {
        const sample = await fetchTraffic();
        // The stream came back while this fetch was in flight: polling ends here.
        if (gen !== generation || streamLive) return;
        ingest(sample);
        setState('polling');
        pollTimer = setTimeout(tick, intervalMs);
      } catch (err) {
        if (gen !== generation) return;
        if (err instanceof AuthError) return needToken();
        if (streamLive) return; // a poll failed but the stream is fine
        if (source) { source.close(); source = null; }
        scheduleRecover(gen, err);
      }
    }, intervalMs);
    // Keep polling, and try to get the push stream back.
    clearTimeout(streamRetryTimer);
    streamRetryTimer = setTimeout(() => {
      if (gen === generation && !source) openStream();
    }, streamRetryMs);
  }

  function scheduleRecover(gen, err) {
    clearTimeout(pollTimer);
    clearTimeout(streamRetryTimer);
    const wait = backoffMs;
    backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
    const retryAt = performance.now() + wait;
    const why = err && err.message && !/fetch|network/i.test(err.message) ? ` (${err.message})` : '';
    const describe = () => {
      const left = Math.max(0, Math.ceil((retryAt - performance.now()) / 1000));
      return `Connection to the daemon lost${why} — retrying in ${left} s…`;
    };
    setState('lost', describe());
    // Count down in the banner so it is obvious that the page is still trying.
    const countdown = setInterval(() => {
      if (gen !== generation || document.body.dataset.state !== 'lost') return clearInterval(countdown);
      dom.bannerText.textContent = describe();
    }, 1000);
    recoverTimer = setTimeout(async () => {
      clearInterval(countdown);
      if (gen !== generation) return;
      dom.bannerText.textContent = 'Connection to the daemon lost — retrying now…';
      try {
        const sample = await fetchTraffic();
        if (gen !== generation) return;
        backoffMs = 1000;
        ingest(sample);
        fetchHealth();
        // Reachable again: straight back to the stream, polling meanwhile.
        startPolling(gen, 0);
      } catch (e) {
        if (gen !== generation) return;
        if (e instanceof AuthError) return needToken();
        scheduleRecover(gen, e);
      }
    }, wait);
  }

  function needToken() {
    stopAll();
    const had = loadToken();
    if (had) clearToken();
    dom.authError.hidden = !had;
    dom.authError.textContent = had ? 'The daemon rejected that token. Check it and try again.' : '';
    setState('auth-required', 'The daemon requires an API token');
    dom.authInput.value = '';
    dom.authInput.focus();
  }

  dom.authForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = dom.authInput.value.trim();
    if (!token) return;
    saveToken(token);
    start();
  });

  /** (Re)start from scratch. The stream sends a snapshot as soon as it is open, so
   * it is the first request; if it fails, probe() finds out why (401, daemon down). */
  function start() {
    stopAll();
    historyStarted = false;
    backoffMs = 1000;
    setState('connecting');
    fetchHealth();
    openStream();
  }

  // ---------- History view ----------

  // Each range: how far back, the bar step, and the report period of its totals
  // table and CSV. 12 months reaches back 334 days, which always gives 12 monthly bars.
  const RANGES = {
    '24h': { span: 86400, step: 'hour', title: 'last 24 hours, hourly' },
    '7d': { span: 7 * 86400, step: 'hour', title: 'last 7 days, hourly' },
    '30d': { span: 30 * 86400, step: 'day', title: 'last 30 days, daily' },
    '12mo': { span: 334 * 86400, step: 'month', title: 'last 12 months, monthly' },
  };
  const HISTORY_REFRESH_MS = 10000;
  const hist = {
    section: $('[data-testid="history"]'),
    sub: $('#history-sub'),
    summary: $('#history-summary'),
    box: $('#history-box'),
    empty: $('#history-empty'),
    canvas: $('#history-chart'),
    rows: $('#history-rows'),
    table: $('[data-testid="history-table"]'),
    port: $('#history-port'),
    ranges: $('#history-ranges'),
    csv: $('#history-csv'),
    range: '24h',
    chart: null,
    request: 0,
    refresh: null,
    knownPorts: new Set(),
    // The drawn series' bucket starts, the daemon's UTC offset, and the tick
    // label of each bar (null: no tick), for the x axis callback.
    starts: [],
    offset: 0,
    tickLabels: [],
  };

  /** "+08:00" -> seconds east of UTC. */
  function parseOffset(text) {
    const m = /^([+-])(\d{2}):(\d{2})$/.exec(text || '');
    return m ? (m[1] === '-' ? -1 : 1) * (Number(m[2]) * 3600 + Number(m[3]) * 60) : 0;
  }

  /** A bucket start as the daemon's calendar sees it (history.utc_offset), not
   * the browser's: a "day" bar is the operator's day. */
  function bucketLabel(t, step, offset) {
    const d = new Date((t + offset) * 1000);
    const month = d.toLocaleString('en', { month: 'short', timeZone: 'UTC' });
    const pad = (n) => String(n).padStart(2, '0');
    if (step === 'month') return `${month} ${d.getUTCFullYear()}`;
    if (step === 'day') return `${month} ${d.getUTCDate()}`;
    return `${month} ${d.getUTCDate()} ${pad(d.getUTCHours())}:00`;
  }

  function rangeQuery() {
    const r = RANGES[hist.range];
    const to = Math.floor(serverNow());
    return { r, from: to - r.span, to };
  }

  function reportUrl(format) {
    const { r, from, to } = rangeQuery();
    return `/api/stats/report?period=${r.step}&from=${from}&to=${to}&format=${format}`;
  }

  /** Every port seen (live or in the stored history) is selectable, named by
   * its target and description while the mapping exists. */
  function updatePortOptions(ports) {
    for (const p of ports) hist.knownPorts.add(p);
    fillMappingPicker(hist.port, [...hist.knownPorts]);
  }

  async function loadHistory() {
    const request = ++hist.request;
    const { r, from, to } = rangeQuery();
    const port = hist.port.value;
    hist.section.dataset.state = 'loading';
    try {
      const [series, report] = await Promise.all([
        fetchApi(`/api/stats/history?step=${r.step}&from=${from}&to=${to}${port ? `&port=${port}` : ''}`),
        fetchApi(reportUrl('json')),
      ]);
      if (request !== hist.request) return; // a newer choice is already loading
      const offset = parseOffset(series.utc_offset);
      const totals = new Map();
      for (const row of report.rows) {
        const t = totals.get(row.port) || { sent: 0, recv: 0 };
        t.sent += row.bytes_sent;
        t.recv += row.bytes_received;
        totals.set(row.port, t);
      }
      updatePortOptions([...(latest ? latest.mappings.map((m) => m.port) : []), ...totals.keys()]);
      renderHistory(series, offset, totals, port);
      hist.section.dataset.state = 'ready';
      loadSources(port, from, to);
      if (connlog.section.dataset.state === 'idle') loadConnLog();
    } catch (err) {
      if (request !== hist.request) return;
      if (err instanceof AuthError) return needToken();
      hist.section.dataset.state = 'error';
      hist.empty.textContent = `History unavailable: ${err.message}`;
      hist.empty.hidden = false;
      hist.box.dataset.bars = '0';
    }
    clearTimeout(hist.refresh);
    // Often enough that the totals keep up with the live cards (the daemon's
    // answer includes the bytes it has not flushed yet).
    hist.refresh = setTimeout(() => { if (document.body.dataset.state !== 'auth-required') loadHistory(); }, HISTORY_REFRESH_MS);
  }

  function renderHistory(series, offset, totals, port) {
    const r = RANGES[hist.range];
    const labels = series.points.map((p) => bucketLabel(p.t, series.step, offset));
    const sent = series.points.map((p) => p.bytes_sent);
    const recv = series.points.map((p) => p.bytes_received);
    const sum = (a) => a.reduce((x, y) => x + y, 0);
    hist.sub.textContent = `${port ? mappingLabel(Number(port)) : 'All mappings'}, ${r.title} (days start at UTC${series.utc_offset})`;
    hist.summary.replaceChildren(
      el('span', {}, el('span', { class: 'swatch swatch-sent', 'aria-hidden': 'true' }), ' Sent ',
        el('strong', { 'data-testid': 'history-sent', 'data-bytes': sum(sent) }, formatBytes(sum(sent)))),
      el('span', {}, el('span', { class: 'swatch swatch-recv', 'aria-hidden': 'true' }), ' Received ',
        el('strong', { 'data-testid': 'history-received', 'data-bytes': sum(recv) }, formatBytes(sum(recv)))));
    hist.box.dataset.bars = String(series.points.length);
    hist.box.dataset.step = series.step;
    hist.starts = series.points.map((p) => p.t);
    hist.offset = offset;
    hist.tickLabels = historyTickLabels(hist.starts, hist.range, offset, hist.canvas.clientWidth);
    if (hist.chart) {
      hist.chart.data.labels = labels;
      hist.chart.data.datasets[0].data = sent;
      hist.chart.data.datasets[1].data = recv;
      fitHistoryAxis();
    }
    const rows = [...totals.entries()]
      .filter(([p]) => !port || String(p) === port)
      .sort((a, b) => a[0] - b[0])
      .map(([p, t]) => el('tr', { 'data-testid': 'history-row', 'data-port': p },
        el('td', { class: 'port', 'data-label': 'Port', 'data-col': 'port' }, `:${p}`),
        el('td', { class: 'num', 'data-label': 'Sent', 'data-col': 'sent', 'data-bytes': t.sent }, formatBytes(t.sent)),
        el('td', { class: 'num', 'data-label': 'Received', 'data-col': 'received', 'data-bytes': t.recv }, formatBytes(t.recv)),
        el('td', { class: 'num', 'data-label': 'Total', 'data-col': 'total', 'data-bytes': t.sent + t.recv }, formatBytes(t.sent + t.recv))));
    hist.rows.replaceChildren(...rows);
    // No port moved bytes in this range: say so instead of empty headings.
    const quiet = rows.length === 0;
    hist.table.hidden = quiet;
    hist.empty.hidden = !quiet;
    hist.empty.textContent = quiet ? 'No traffic in this range' : '';
  }

  // How many bars (hours, days, months) one tick may stand for, finest first.
  const HISTORY_TICK_EVERY = { '24h': [1, 2, 3, 6, 12], '7d': [1, 2, 7], '30d': [1, 2, 7, 14], '12mo': [1, 2, 3, 6] };

  /** The label of each bar that gets a tick, null for the others: round
   * boundaries of the daemon's calendar, as many as fit in about 64 px each.
   * 24 h: every 1, 2, 3, 6 or 12 hours (a midnight shows its date); 7 d: each
   * midnight (or every other); 30 d: each day, every other, or Mondays; 12 mo:
   * each month, or every 2, 3 or 6 (a January shows its year). */
  function historyTickLabels(starts, range, offset, width) {
    const fit = Math.max(2, Math.floor((width || 600) / 64));
    const pad = (n) => String(n).padStart(2, '0');
    const monthName = (d) => d.toLocaleString('en', { month: 'short', timeZone: 'UTC' });
    // For each bar: whether it starts a round unit of this range, the unit's
    // number (to pick every k-th), and its label.
    const marks = starts.map((t) => {
      const d = new Date((t + offset) * 1000);
      const day = Math.floor((t + offset) / 86400);
      const date = `${monthName(d)} ${d.getUTCDate()}`;
      switch (range) {
        case '24h': return { on: d.getUTCMinutes() === 0, n: d.getUTCHours(), label: d.getUTCHours() === 0 ? date : `${pad(d.getUTCHours())}:00` };
        case '7d': return { on: d.getUTCHours() === 0 && d.getUTCMinutes() === 0, n: day, label: date };
        // Day 0 (1970-01-01) was a Thursday: day + 3 counts from a Monday.
        case '30d': return { on: true, n: day + 3, label: date };
        default: return { on: true, n: d.getUTCFullYear() * 12 + d.getUTCMonth(), label: d.getUTCMonth() === 0 ? `${monthName(d)} ${d.getUTCFullYear()}` : monthName(d) };
      }
    });
    const every = HISTORY_TICK_EVERY[range] || [1];
    const pick = (k) => marks.map((m) => m.on && m.n % k === 0);
    let chosen = pick(every[every.length - 1]);
    for (const k of every) {
      const picked = pick(k);
      if (picked.filter(Boolean).length <= fit) { chosen = picked; break; }
    }
    return marks.map((m, i) => (chosen[i] ? m.label : null));
  }

  /** Round binary steps on the bar chart's axis, as on the live chart. */
  function fitHistoryAxis() {
    const max = Math.max(0, ...hist.chart.data.datasets.flatMap((d) => d.data));
    hist.chart.options.scales.y.ticks.stepSize = niceStep(max);
    hist.chart.options.scales.y.suggestedMax = max > 0 ? undefined : 1024; // an empty range still gets a sane axis
    hist.chart.update('none');
  }

  function createHistoryChart() {
    if (typeof window.Chart !== 'function') return;
    const col = chartColors();
    const bars = (label, color) => ({ label, data: [], backgroundColor: color, borderRadius: 3, maxBarThickness: 28 });
    hist.chart = new window.Chart(hist.canvas, {
      type: 'bar',
      data: { labels: [], datasets: [bars('Sent', col.sent), bars('Received', col.recv)] },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        // A new width fits a different number of labels.
        onResize: (c, size) => { hist.tickLabels = historyTickLabels(hist.starts, hist.range, hist.offset, size.width); },
        interaction: { mode: 'index', intersect: false },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: (ctx) => ` ${ctx.dataset.label}: ${formatBytes(ctx.parsed.y)}` } },
        },
        scales: {
          // Labels only on round boundaries (historyTickLabels), none skipped by Chart.js.
          x: {
            grid: { display: false },
            border: { color: col.grid },
            ticks: { color: col.muted, maxRotation: 0, autoSkip: false, callback: (v, i) => hist.tickLabels[i] ?? null },
          },
          y: {
            beginAtZero: true,
            grid: { color: col.grid },
            border: { display: false },
            suggestedMax: 1024,
            ticks: { color: col.muted, stepSize: niceStep(0), callback: (v) => trimZeros(formatBytes(v)) },
          },
        },
      },
    });
  }

  hist.ranges.addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-range]');
    if (!button) return;
    hist.range = button.dataset.range;
    for (const b of hist.ranges.querySelectorAll('button')) b.setAttribute('aria-pressed', String(b === button));
    loadHistory();
  });
  hist.port.addEventListener('change', () => loadHistory());

  // A plain link cannot carry the Authorization header; fetch the CSV with it and
  // hand the browser a file, named as the daemon's Content-Disposition says.
  hist.csv.addEventListener('click', async () => {
    hist.csv.disabled = true;
    try {
      const res = await fetch(reportUrl('csv'), { headers: authHeaders(), cache: 'no-store' });
      if (res.status === 401) return needToken();
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const name = /filename="([^"]+)"/.exec(res.headers.get('Content-Disposition') || '');
      const url = URL.createObjectURL(await res.blob());
      const a = el('a', { href: url, download: name ? name[1] : 'tunneld-report.csv' });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      hist.section.dataset.csv = 'downloaded';
    } catch (err) {
      hist.section.dataset.csv = 'failed';
      hist.summary.append(el('span', { class: 'history-error', role: 'alert' }, `CSV download failed: ${err.message}`));
    } finally {
      hist.csv.disabled = false;
    }
  });

  // ---------- Top sources and the connection log ----------

  // Beside the history: who moved the bytes of the chosen mapping (or all) in
  // the chosen range, from the connection log ("who used this quota").
  const sourcesDom = { box: $('#sources'), sub: $('#sources-sub'), list: $('#sources-list'), empty: $('#sources-empty') };
  let sourcesRequest = 0;

  async function loadSources(port, from, to) {
    const request = ++sourcesRequest;
    try {
      const data = await fetchApi(`/api/stats/sources?from=${from}&to=${to}&limit=10${port ? `&port=${port}` : ''}`);
      if (request !== sourcesRequest) return;
      const top = data.sources;
      const most = Math.max(1, ...top.map((s) => s.bytes_sent + s.bytes_received));
      sourcesDom.sub.textContent = `${port ? `:${port}` : 'All mappings'}, ${RANGES[hist.range].title.replace(/,.*/, '')}, from the connection log`;
      sourcesDom.list.replaceChildren(...top.map((s) => {
        const total = s.bytes_sent + s.bytes_received;
        return el('li', { 'data-testid': 'source', 'data-source': s.source, 'data-bytes': total, 'data-connections': s.connections },
          el('span', { class: 'source-address' }, s.source),
          el('span', { class: 'source-bar', 'aria-hidden': 'true' }, el('span', { style: `width: ${(100 * total / most).toFixed(1)}%` })),
          el('span', { class: 'source-total' }, formatBytes(total)),
          el('span', { class: 'source-count' }, s.connections === 1 ? '1 connection' : `${intFormat.format(s.connections)} connections`));
      }));
      sourcesDom.empty.hidden = top.length > 0;
      sourcesDom.box.dataset.state = 'ready';
    } catch (err) {
      if (request !== sourcesRequest) return;
      if (err instanceof AuthError) return;
      sourcesDom.box.dataset.state = 'error';
      sourcesDom.empty.textContent = `Sources unavailable: ${err.message}`;
      sourcesDom.empty.hidden = false;
    }
  }

  const connlog = {
    section: $('[data-testid="connlog"]'),
    form: $('#connlog-form'),
    rows: $('#connlog-rows'),
    empty: $('#connlog-empty'),
    csv: $('#connlog-csv'),
    request: 0,
  };

  /** The log's query from the filters (times typed in the browser's zone). */
  function connlogQuery(format) {
    const f = new FormData(connlog.form);
    const q = new URLSearchParams();
    for (const key of ['port', 'client', 'source']) {
      const v = String(f.get(key) || '').trim();
      if (v) q.set(key, v);
    }
    // A plain text field (a date picker's icon would be an image the page
    // loads): local time as YYYY-MM-DD[ HH:MM], or Unix seconds.
    for (const key of ['from', 'to']) {
      const v = String(f.get(key) || '').trim();
      if (!v) continue;
      const secs = /^\d+$/.test(v) ? Number(v) : Math.floor(new Date(v.replace(' ', 'T')).getTime() / 1000);
      if (Number.isFinite(secs)) q.set(key, String(secs));
    }
    q.set('limit', format === 'csv' ? '100000' : '200');
    if (format === 'csv') q.set('format', 'csv');
    return `/api/connections/log?${q}`;
  }

  function endBadge(c) {
    const bad = ['target_unreachable', 'target_reset', 'refused'].includes(c.end);
    const warn = ['visitor_reset', 'idle_timeout', 'closed_by_api', 'mapping_removed', 'client_removed', 'shutdown'].includes(c.end);
    const text = c.end === 'refused' && c.reason ? `refused: ${c.reason}` : c.end.replace(/_/g, ' ');
    return el('span', { class: `badge ${bad ? 'badge-bad' : warn ? 'badge-warn' : 'badge-ok'}`, 'data-role': 'end', title: c.reason || '' }, text);
  }

  async function loadConnLog() {
    const request = ++connlog.request;
    fillMappingPicker(connlog.form.elements.port, [...hist.knownPorts]);
    try {
      const data = await fetchApi(connlogQuery('json'));
      if (request !== connlog.request) return;
      connlog.rows.replaceChildren(...data.connections.map((c) => el('tr', { 'data-testid': 'connlog-row', 'data-id': c.id, 'data-end': c.end },
        el('td', { 'data-label': 'Ended' }, el('time', { datetime: new Date(c.ended_at * 1000).toISOString() }, new Date(c.ended_at * 1000).toLocaleString())),
        el('td', { class: 'port', 'data-label': 'Port' }, `:${c.port}`),
        el('td', { class: 'conn-source', 'data-label': 'Source' }, c.source),
        el('td', { 'data-label': 'Client' }, c.client || '—'),
        el('td', { class: 'num', 'data-label': 'Lasted' }, formatDuration(Math.max(0, c.ended_at - c.started_at))),
        el('td', { class: 'num', 'data-label': 'Sent' }, formatBytes(c.bytes_sent)),
        el('td', { class: 'num', 'data-label': 'Received' }, formatBytes(c.bytes_received)),
        el('td', { 'data-label': 'End' }, endBadge(c)))));
      connlog.empty.textContent = data.enabled ? 'No ended connections match.' : 'The connection log is off on this server (history.connection_log = false).';
      connlog.empty.hidden = data.connections.length > 0;
      connlog.section.dataset.state = 'ready';
    } catch (err) {
      if (request !== connlog.request) return;
      if (err instanceof AuthError) return;
      connlog.section.dataset.state = 'error';
      connlog.empty.textContent = `Connection log unavailable: ${err.message}`;
      connlog.empty.hidden = false;
    }
  }

  connlog.form.addEventListener('submit', (e) => {
    e.preventDefault();
    loadConnLog();
  });
  connlog.csv.addEventListener('click', async () => {
    connlog.csv.disabled = true;
    try {
      const res = await fetch(connlogQuery('csv'), { headers: authHeaders(), cache: 'no-store' });
      if (res.status === 401) return needToken();
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const url = URL.createObjectURL(await res.blob());
      const a = el('a', { href: url, download: 'tunneld-connections.csv' });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      connlog.section.dataset.csv = 'downloaded';
    } catch (err) {
      connlog.section.dataset.csv = 'failed';
      connlog.empty.textContent = `CSV download failed: ${err.message}`;
      connlog.empty.hidden = false;
    } finally {
      connlog.csv.disabled = false;
    }
  });

  // Read-only copies of what the charts drew, for tests and curious operators.
  window.tunneldCharts = Object.freeze({
    /** The live chart: the charted port (null: all), its steps {from, to, sent,
     * recv, kind: minute|sample}, gaps {from, to}, the x range and the ticks. */
    live: () => JSON.parse(JSON.stringify({
      ...drawnLive,
      // Read from the scale: a resize re-ticks the axis between samples.
      ticks: chart ? chart.scales.x.ticks.map((t) => ({ value: t.value, label: t.label })) : [],
    })),
    /** The history chart: range, step, UTC offset, and each tick as {t: bucket
     * start, label}. */
    history: () => JSON.parse(JSON.stringify({
      range: hist.range,
      step: hist.box.dataset.step || null,
      offset: hist.offset,
      bars: hist.starts.length,
      ticks: hist.chart
        ? hist.chart.scales.x.ticks.filter((t) => t.label != null && t.label !== '').map((t) => ({ t: hist.starts[t.value], label: t.label }))
        : hist.tickLabels.flatMap((label, i) => (label == null ? [] : [{ t: hist.starts[i], label }])),
    })),
  });

  createChart();
  createHistoryChart();
  // Follow the system theme live, chart included (CSS handles everything else).
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', applyChartTheme);
  start();
})();
