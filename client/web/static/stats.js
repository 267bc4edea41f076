// Client-side counters, exposed as window.cloudqStats (a plain object, so WebDriver can read it).
//
// Input latency is measured as the Python client does (client/stats.py): for each input event
// sent, the time from sending it to decoding the first frame whose capture time (the node's
// wall clock) is later. Both clocks are wall clocks, so across hosts the figure is only as good
// as their clock sync. Events that no frame answers within LATENCY_HORIZON are not counted.

const WINDOW_MS = 2000;
const LATENCY_HORIZON = 5.0; // seconds
const MAX_SAMPLES = 2000;

/** Seconds since the epoch with sub-millisecond resolution (Date.now() has whole milliseconds);
 * the same clock as the node's capture times, like time.time() in the Python client. */
export function wallClock() {
  return (performance.timeOrigin + performance.now()) / 1000;
}

const ROLLING = 200; // samples behind each rolling median

export class Stats {
  constructor() {
    this.pub = {
      user: null, sid: null, rights: null, closeReason: null, state: null, media: '',
      frames: 0, keyframes: 0, packets: 0, bytes: 0, gaps: 0, decodeErrors: 0,
      keyframeRequests: 0, dropped: 0, connects: 0, disconnects: 0,
      clipboard: { sent: 0, received: 0, written: 0, errors: 0, dropped: 0 },
      // the window's size (device pixels) sent to the node, and how long until a frame had it
      resize: { sent: 0, wantWidth: 0, wantHeight: 0, applied: 0, lastMs: null },
      fps: 0, bitrate: 0, codec: null, width: 0, height: 0,
      // input -> decoded frame (ms), measured like the Python client
      latency: { p50: null, p99: null, n: 0, last: null, unanswered: 0 },
      // where a frame's time goes, medians of the last ROLLING frames (ms):
      transitMs: { p50: null }, // captured on the node -> its packet arrived here (encode, Redis, gateway)
      decodeMs: { p50: null }, // packet arrived -> WebCodecs output
      drawMs: { p50: null }, // output -> drawn on the canvas
    };
    this.recent = []; // [ms, bytes, isFrame]
    this.pending = []; // send times (s) of unanswered input events
    this.sorted = []; // latency samples (ms), ascending
    this.rolling = { transitMs: [], decodeMs: [], drawMs: [] };
  }

  onPacket(bytes, keyframe) {
    this.pub.packets++;
    this.pub.bytes += bytes;
    if (keyframe) this.pub.keyframes++;
    this.recent.push([performance.now(), bytes, false]);
  }

  /**
   * A frame was decoded and drawn. ``decodedWall``: wall clock (s) when WebCodecs output it;
   * ``arrivedWall``: when its packet arrived (null: unknown); ``decodeMs``, ``drawMs``: durations.
   */
  onFrame({ captureTime, decodedWall, arrivedWall = null, decodeMs = null, drawMs = null }) {
    const p = this.pub;
    p.frames++;
    this.recent.push([performance.now(), 0, true]);
    this.roll('decodeMs', decodeMs);
    this.roll('drawMs', drawMs);
    if (arrivedWall !== null && captureTime) this.roll('transitMs', (arrivedWall - captureTime) * 1000);
    let last = null;
    while (this.pending.length && this.pending[0] <= captureTime) {
      last = (decodedWall - this.pending.shift()) * 1000;
      this.addSample(last);
    }
    if (last !== null) this.summarise(last);
  }

  roll(name, value) {
    if (value === null || !Number.isFinite(value)) return;
    const a = this.rolling[name];
    a.push(value);
    if (a.length > ROLLING) a.shift();
  }

  onInputSent(sendTime) {
    while (this.pending.length && sendTime - this.pending[0] > LATENCY_HORIZON) {
      this.pending.shift();
      this.pub.latency.unanswered++;
    }
    this.pending.push(sendTime);
  }

  /** Forget unanswered inputs (after a reconnect the old ones will never be answered fairly). */
  resetPending() {
    this.pub.latency.unanswered += this.pending.length;
    this.pending = [];
  }

  addSample(ms) {
    if (this.sorted.length >= MAX_SAMPLES) return;
    const v = Math.round(ms * 100) / 100;
    let lo = 0, hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.sorted[mid] <= v) lo = mid + 1; else hi = mid;
    }
    this.sorted.splice(lo, 0, v);
  }

  percentile(q) {
    const s = this.sorted;
    if (!s.length) return null;
    return s[Math.min(s.length - 1, Math.max(0, Math.round((q / 100) * (s.length - 1))))];
  }

  summarise(last) {
    const l = this.pub.latency;
    l.n = this.sorted.length;
    l.p50 = this.percentile(50);
    l.p99 = this.percentile(99);
    l.last = Math.round(last * 100) / 100;
  }

  /** Recompute fps and bitrate over the last WINDOW_MS; returns the public object. */
  tick() {
    const now = performance.now();
    while (this.recent.length && now - this.recent[0][0] > WINDOW_MS) this.recent.shift();
    let frames = 0, bytes = 0;
    for (const [, b, f] of this.recent) { bytes += b; if (f) frames++; }
    this.pub.fps = Math.round((frames / (WINDOW_MS / 1000)) * 10) / 10;
    this.pub.bitrate = Math.round((bytes * 8) / (WINDOW_MS / 1000));
    for (const [name, values] of Object.entries(this.rolling)) {
      if (!values.length) continue;
      const d = [...values].sort((a, b) => a - b);
      this.pub[name].p50 = Math.round(d[d.length >> 1] * 100) / 100;
    }
    return this.pub;
  }
}
