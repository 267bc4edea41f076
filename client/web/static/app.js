// cloudq browser client: login, then one WebSocket carrying H.264 (binary) and control (JSON).
// The protocol is described in client/web/__init__.py's docstring.

import { AudioPipe } from './audio.js';
import { CLOSE_SESSION, CLOSE_UNAUTHORIZED, Connection, closeWords, rememberSid, sidQuery } from './connection.js';
import { FilePanel } from './files.js';
import { InputCapture, MAX_CLIPBOARD_BYTES } from './input.js';
import { Stats, wallClock } from './stats.js';
import { VideoPipe } from './video.js';

const STATUS_EVERY_MS = 500;
const RESIZE_DEBOUNCE_MS = 300; // a window being dragged sends its size once it rests

const STATE_WORDS = {
  connecting: 'connecting',
  queued: 'queued: waiting for a free node',
  starting: 'starting (loading your data onto a node)',
  active: 'active',
  disconnected: 'disconnected',
  sleeping: 'sleeping (no input for a while: move the mouse or press a key)',
  reconnecting: 'reconnecting',
  closed: 'closed',
};

// Why a session closed, in words: the gateway sends them with the reason ({t: 'close', reason,
// text}, worded by cloudq/sessionend.py as `cloudq connect` words them); the page keeps no table.
const UNAUTHORIZED = 'you are not logged in (or the login expired): please log in again';

const params = new URLSearchParams(location.search);
const stats = new Stats();
window.cloudqStats = stats.pub;

const el = {
  login: document.getElementById('login'),
  loginError: document.getElementById('login-error'),
  queue: document.getElementById('queue'),
  viewer: document.getElementById('viewer'),
  stage: document.getElementById('stage'),
  status: document.getElementById('status'),
  logout: document.getElementById('logout'),
};

let session = null;

class Session {
  constructor(user) {
    this.user = user;
    stats.pub.user = user;
    this.state = 'connecting';
    this.node = '';
    this.warning = '';
    this.note = ''; // why we are reconnecting / closed
    this.seq = 0;
    this.canvas = document.createElement('canvas');
    this.canvas.id = 'screen';
    this.canvas.width = 16;
    this.canvas.height = 9;
    this.canvas.setAttribute('aria-label', 'remote screen');
    el.stage.replaceChildren(this.canvas);
    this.video = new VideoPipe({
      canvas: this.canvas,
      stats,
      requestKeyframe: () => this.conn.send({ t: 'keyframe' }),
      onWarning: (w) => this.warn(w),
      onResize: (w, h) => this.frameResized(w, h),
      codec: params.get('codec') || undefined,
      readback: params.has('readback'),
    });
    this.audio = new AudioPipe({ stats });
    this.files = new FilePanel({ stage: el.stage, bar: el.logout.parentElement, before: el.logout, stats });
    this.input = new InputCapture(
      this.canvas,
      (type, fields) => this.sendInput(type, fields),
      (text) => this.sendClipboard(text),
    );
    this.clip = null; // the clipboard text last sent or received (not sent again)
    this.conn = new Connection({
      onOpen: () => this.onOpen(),
      onBinary: (buf) => (new Uint8Array(buf, 0, 1)[0] === 2 ? this.audio.push(buf) : this.video.push(buf)),
      onControl: (msg) => this.onControl(msg),
      onDown: (d) => this.onDown(d),
      onEnd: (d) => this.onEnd(d),
    });
    this.resizer = new ResizeObserver(() => { this.fit(); this.sizeChanged(); });
    this.timer = null;
    this.resizeTimer = null;
    this.wanted = null; // [w, h, sent at (ms)]: the size last asked of the node
  }

  start() {
    el.viewer.hidden = false;
    this.input.attach();
    this.files.attach();
    this.resizer.observe(el.stage);
    this.timer = setInterval(() => this.render(), STATUS_EVERY_MS);
    this.conn.start();
    this.canvas.focus({ preventScroll: true });
    this.render();
  }

  stop() {
    clearInterval(this.timer);
    clearTimeout(this.resizeTimer);
    this.resizer.disconnect();
    this.input.detach();
    this.files.detach();
    this.conn.stop();
    this.video.close();
    this.audio.close();
    this.canvas.remove();
    el.viewer.hidden = true;
    el.queue.hidden = true;
  }

  onOpen() {
    stats.pub.connects++;
    this.video.reset();
    stats.resetPending();
    this.setState('connecting');
  }

  onControl(msg) {
    switch (msg.t) {
      case 'hello':
        this.conn.healthy();
        this.note = '';
        stats.pub.sid = String(msg.sid || '');
        rememberSid(stats.pub.sid);
        stats.pub.rights = String(msg.rights || '');
        this.node = String(msg.node || '');
        this.sendSize(true); // a new connection (a reconnect too): the node learns our size again
        break;
      case 'state': {
        if (msg.node !== undefined) this.node = String(msg.node || '');
        const was = this.state;
        this.setState(String(msg.state), msg.position);
        // the node reads input from when it started the session: a size sent before that is lost
        if (this.state === 'active' && was !== 'active') this.sendSize(true);
        break;
      }
      case 'warning':
        this.warn(String(msg.text || msg.warning || '')); // the gateway words it (cloudq.sessionend)
        break;
      case 'media': // the session's media server stopped answering (the session is kept), or is back
        stats.pub.media = String(msg.state || '');
        this.note = msg.state === 'lost' ? 'media server lost: waiting for it (your session is kept)' : '';
        break;
      case 'clipboard':
        this.gotClipboard(String(msg.text || ''));
        break;
      case 'keyframe': // the server lost packets on its side and resyncs us
        this.video.lost('server asked for a resync');
        break;
      case 'close':
        this.note = String(msg.text || closeWords(CLOSE_SESSION));
        stats.pub.closeReason = String(msg.reason || '');
        break;
      default:
        break; // a newer server's message: ignore
    }
    this.render();
  }

  onDown({ code, reason, retryInMs }) {
    stats.pub.disconnects++;
    this.note = `${closeWords(code, reason)}; reconnecting in ${(retryInMs / 1000).toFixed(1)} s`;
    this.setState('reconnecting');
  }

  onEnd({ code, reason }) {
    stats.pub.disconnects++;
    if (code === CLOSE_UNAUTHORIZED) {
      logout(UNAUTHORIZED);
      return;
    }
    if (code === CLOSE_SESSION && !this.note) this.note = closeWords(code, reason);
    this.setState('closed');
    // the last picture and the reason stay on screen; the form is there to log in again
    this.input.detach();
    el.login.hidden = false;
    el.loginError.textContent = this.note;
  }

  setState(state, position) {
    this.state = state;
    stats.pub.state = state;
    if (state === 'queued' && Number.isInteger(position)) {
      el.queue.textContent = `You are number ${position} in the queue.`;
      el.queue.hidden = false;
    } else {
      el.queue.hidden = true;
    }
    this.render();
  }

  warn(text) {
    this.warning = text;
    this.render();
  }

  sendInput(type, fields) {
    const ct = wallClock();
    const ok = this.conn.send({ t: 'input', type, seq: this.seq++, ct, ...fields });
    if (ok) stats.onInputSent(ct);
    return ok;
  }

  /** The browser's clipboard text -> the remote CLIPBOARD and PRIMARY (at most 1 MiB of UTF-8). */
  sendClipboard(text) {
    if (!text || text === this.clip) return;
    const c = stats.pub.clipboard;
    if (new TextEncoder().encode(text).length > MAX_CLIPBOARD_BYTES) {
      c.dropped++;
      this.warn('clipboard text over 1 MiB: not sent');
      return;
    }
    const ok = this.conn.send({ t: 'input', type: 'clipboard', seq: this.seq++, ct: wallClock(), text });
    if (ok) {
      this.clip = text;
      c.sent++;
    } else {
      c.dropped++;
    }
  }

  /** A program in the session set its clipboard: so does the browser (if permitted). */
  gotClipboard(text) {
    if (!text) return;
    const c = stats.pub.clipboard;
    c.received++;
    this.clip = text;
    if (!navigator.clipboard || !navigator.clipboard.writeText) {
      c.errors++;
      return;
    }
    navigator.clipboard.writeText(text).then(
      () => { c.written++; },
      () => { c.errors++; }, // no permission, or the page has no focus: the text is lost
    );
  }

  /** The stage changed size: tell the node once it has rested for RESIZE_DEBOUNCE_MS. */
  sizeChanged() {
    clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => this.sendSize(false), RESIZE_DEBOUNCE_MS);
  }

  /** Ask the node for a picture of the stage's size in device pixels (it clamps to its maximum;
   * an app that cannot resize ignores it). ``always``: even if that size was asked already. */
  sendSize(always) {
    const dpr = window.devicePixelRatio || 1;
    const width = Math.round(el.stage.clientWidth * dpr);
    const height = Math.round(el.stage.clientHeight * dpr);
    if (!width || !height) return;
    if (!always && this.wanted && this.wanted[0] === width && this.wanted[1] === height) return;
    const ok = this.conn.send({ t: 'input', type: 'resize', seq: this.seq++, ct: wallClock(), width, height });
    if (!ok) return;
    this.wanted = [width, height, performance.now()];
    const r = stats.pub.resize;
    r.sent++;
    r.wantWidth = width;
    r.wantHeight = height;
  }

  /** A frame of a new size was decoded: fit it; if it is the size asked for, time the resize. */
  frameResized(w, h) {
    this.fit();
    const want = this.wanted;
    if (want && want[2] !== null && Math.abs(want[0] - w) <= 2 && Math.abs(want[1] - h) <= 2) {
      stats.pub.resize.applied++;
      stats.pub.resize.lastMs = performance.now() - want[2];
      want[2] = null;
    }
  }

  /** Scale the canvas to the stage, keeping the aspect ratio. */
  fit() {
    const { clientWidth: aw, clientHeight: ah } = el.stage;
    const { width: w, height: h } = this.canvas;
    if (!aw || !ah || !w || !h) return;
    const scale = Math.min(aw / w, ah / h);
    this.canvas.style.width = `${Math.floor(w * scale)}px`;
    this.canvas.style.height = `${Math.floor(h * scale)}px`;
  }

  render() {
    const p = stats.tick();
    const parts = [(STATE_WORDS[this.state] || this.state) + (this.node && this.state !== 'closed' ? ` on ${this.node}` : '')];
    if (this.state === 'active' || this.state === 'sleeping') {
      parts.push(`${p.fps.toFixed(0)} fps`, `${(p.bitrate / 1e6).toFixed(2)} Mbit/s`);
      if (p.latency.n) parts.push(`input ${p.latency.last ?? p.latency.p50} ms (p50 ${p.latency.p50}, p99 ${p.latency.p99})`);
    }
    if (this.note) parts.push(this.note);
    if (this.warning) parts.push(`warning: ${this.warning}`);
    el.status.textContent = parts.join(' · ');
    el.status.dataset.state = this.state;
  }
}

async function api(path, body) {
  const resp = await fetch(path, {
    method: body === undefined ? 'GET' : 'POST',
    headers: body === undefined ? {} : { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
    cache: 'no-store',
  });
  let data = {};
  try { data = await resp.json(); } catch { /* not JSON */ }
  return { status: resp.status, data };
}

function begin(user) {
  if (session) session.stop();
  el.login.hidden = true;
  el.loginError.textContent = '';
  session = new Session(user);
  session.start();
}

function logout(message = '') {
  if (session) session.stop();
  session = null;
  el.login.hidden = false;
  el.loginError.textContent = message;
  el.login.querySelector('input[name=password]').value = '';
}

el.login.addEventListener('submit', async (e) => {
  e.preventDefault();
  const form = new FormData(el.login);
  const button = el.login.querySelector('button[type=submit]');
  button.disabled = true;
  el.loginError.textContent = '';
  try {
    const { status, data } = await api('/login', { user: form.get('user'), password: form.get('password') });
    if (status === 200) { rememberSid(String(data.sid || '')); begin(data.user); }
    else el.loginError.textContent = data.error || `login failed (HTTP ${status})`;
  } catch (err) {
    el.loginError.textContent = `cannot reach the server (${err.message})`;
  } finally {
    button.disabled = false;
  }
});

el.logout.addEventListener('click', async () => {
  try { await api('/logout', {}); } catch { /* the cookie goes when it expires */ }
  rememberSid('');
  logout('');
});

// a page reload with a valid cookie re-attaches without the form
(async () => {
  try {
    const { status, data } = await api(`/session${sidQuery()}`);
    if (status === 200 && !session) { begin(data.user); return; }
  } catch { /* server down: show the form */ }
  el.login.hidden = false;
})();
