// The WebSocket to the server: same origin, path /ws, authenticated by the HttpOnly session
// cookie (never a token in the URL). Reconnects with exponential backoff and full jitter until
// stop() or a close that must not be retried (not logged in, session closed by the server).

const BACKOFF_FIRST_MS = 250;
const BACKOFF_MAX_MS = 5000;
const SILENCE_MS = 10000; // no message for this long: the connection is dead, reconnect

export const CLOSE_SESSION = 4001;
export const CLOSE_UNAUTHORIZED = 4401;

const CLOSE_WORDS = {
  1000: 'the connection was closed',
  1001: 'the server is going away',
  1006: 'the connection was lost',
  1008: 'the server refused a message from this page',
  1009: 'a message from this page was too large',
  1011: 'the server hit an internal error',
  1013: 'the gateway cannot reach the service',
  [CLOSE_UNAUTHORIZED]: 'you are not logged in (or the login expired)',
  [CLOSE_SESSION]: 'the session was closed',
};

export function closeWords(code, reason) {
  const base = CLOSE_WORDS[code] || `the connection closed (code ${code})`;
  return reason && code !== CLOSE_SESSION ? `${base}: ${reason}` : base;
}

// The session id of this tab's last `hello` (not a secret: the cookie's token is what
// authenticates). The gateway cannot look a user's session up by name, so a reload or a
// reconnect names it; the gateway checks it against the token.
const SID_KEY = 'cloudq_sid';
export function rememberSid(sid) {
  try { if (sid) sessionStorage.setItem(SID_KEY, sid); else sessionStorage.removeItem(SID_KEY); } catch { /* storage off */ }
}
export function sidQuery() {
  let sid = '';
  try { sid = sessionStorage.getItem(SID_KEY) || ''; } catch { /* storage off */ }
  return sid ? `?sid=${encodeURIComponent(sid)}` : '';
}

export class Connection {
  /**
   * @param {object} h  handlers: onOpen(), onBinary(ArrayBuffer), onControl(obj),
   *   onDown({code, reason, retryInMs}) when a socket closes and another will be tried,
   *   onEnd({code, reason}) when no other will be tried
   */
  constructor(h) {
    this.h = h;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.watchdog = null;
    this.lastMessage = 0;
    this.stopped = true;
  }

  url() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${location.host}/ws${sidQuery()}`;
  }

  start() {
    this.stopped = false;
    this.attempt = 0;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      ws.close(1000, 'bye');
    }
  }

  /** The server accepted us (hello): later drops start the backoff from the beginning. */
  healthy() {
    this.attempt = 0;
  }

  /** Send a JSON control message; false if there is no open socket or it is backed up. */
  send(obj) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || ws.bufferedAmount > 65536) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  open() {
    clearTimeout(this.timer);
    const ws = new WebSocket(this.url());
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => {
      this.lastMessage = performance.now();
      clearInterval(this.watchdog);
      this.watchdog = setInterval(() => {
        if (this.ws === ws && performance.now() - this.lastMessage > SILENCE_MS) {
          console.warn('ws: silent too long; reconnecting');
          ws.close(4000, 'silent');
          this.dropped(ws, 1006, 'no data from the server');
        }
      }, 1000);
      this.h.onOpen();
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastMessage = performance.now();
      if (typeof ev.data === 'string') {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (e) {
          console.warn('ws: bad control message', e);
          return;
        }
        if (msg && typeof msg === 'object') this.h.onControl(msg);
      } else {
        this.h.onBinary(ev.data);
      }
    };
    ws.onclose = (ev) => this.dropped(ws, ev.code, ev.reason);
  }

  dropped(ws, code, reason) {
    if (this.ws !== ws) return; // an old socket
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    this.ws = null;
    clearInterval(this.watchdog);
    if (this.stopped) return;
    if (code === CLOSE_UNAUTHORIZED || code === CLOSE_SESSION) {
      this.stopped = true;
      this.h.onEnd({ code, reason });
      return;
    }
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    const delay = Math.round(cap / 2 + Math.random() * (cap / 2)); // "equal jitter"
    this.attempt = Math.min(this.attempt + 1, 16);
    this.h.onDown({ code, reason, retryInMs: delay });
    this.timer = setTimeout(() => {
      if (!this.stopped) this.open();
    }, delay);
  }
}
