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

export class Stats {
  constructor() {
    this.pub = {
      user: null, sid: null, rights: null, closeReason: null, state: null, frames: 0, keyframes: 0, packets: 0, bytes: 0, gaps: 0, decodeErrors: 0,
      keyframeRequests: 0, dropped: 0, connects: 0, disconnects: 0,
      fps: 0, bitrate: 0, codec: null, width: 0, height: 0,
      latency: { p50: null, p99: null, n: 0, last: null, unanswered: 0 },
      decodeMs: { p50: null }, // packet arrival -> frame drawn
      transitMs: { p50: null }, // capture on the node -> packet arrival in the page (render, encode, Redis, gateway)
    };
    this.recent = []; // [ms, bytes, isFrame]
    this.pending = []; // send times (s) of unanswered input events
    this.sorted = []; // latency samples (ms), ascending
    this.decodeSamples = []; // packet arrival -> frame drawn (ms), the last 200
    this.transitSamples = []; // node capture -> packet arrival in the page (ms; wall clocks), the last 200
  }

  onPacket(bytes, keyframe) {
    this.pub.packets++;
    this.pub.bytes += bytes;
    if (keyframe) this.pub.keyframes++;
    this.recent.push([performance.now(), bytes, false]);
  }

  /** A frame was drawn; ``decodeMs``: from its packet's arrival to now (null: unknown). */
  onFrame(captureTime, decodeMs = null, arrivedWall = null) {
    const p = this.pub;
    p.frames++;
    this.recent.push([performance.now(), 0, true]);
    if (decodeMs !== null) {
      this.decodeSamples.push(decodeMs);
      if (this.decodeSamples.length > 200) this.decodeSamples.shift();
    }
    if (arrivedWall !== null && captureTime) {
      this.transitSamples.push((arrivedWall - captureTime) * 1000);
      if (this.transitSamples.length > 200) this.transitSamples.shift();
    }
    const now = wallClock();
    let last = null;
    while (this.pending.length && this.pending[0] <= captureTime) {
      last = (now - this.pending.shift()) * 1000;
      this.addSample(last);
    }
    if (last !== null) this.summarise(last);
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
    if (this.decodeSamples.length) {
      const d = [...this.decodeSamples].sort((a, b) => a - b);
      this.pub.decodeMs.p50 = Math.round(d[d.length >> 1] * 100) / 100;
    }
    if (this.transitSamples.length) {
      const d = [...this.transitSamples].sort((a, b) => a - b);
      this.pub.transitMs.p50 = Math.round(d[d.length >> 1] * 100) / 100;
    }
    return this.pub;
  }
}
