// Video: binary packets -> WebCodecs VideoDecoder -> canvas.
//
// The decoder only ever gets a chain that starts at an IDR and continues without a gap in seq.
// A gap, a bad packet, a decode error or a decoder that falls behind drops everything until the
// next keyframe and asks the server for one (at most KEYFRAME_REQUESTS_PER_S a second).

import { FALLBACK_CODEC, codecFromSps, isIdr, parseVideoPacket } from './protocol.js';
import { wallClock } from './stats.js';

const KEYFRAME_REQUEST_INTERVAL_MS = 250; // 4 a second
const MAX_DECODE_QUEUE = 16; // packets queued in the decoder before we skip to a keyframe
const MAX_PENDING = 120; // packets held while a codec string is being checked
const MAX_CAPTURES = 256;

export class VideoPipe {
  /**
   * @param {object} o
   * @param {HTMLCanvasElement} o.canvas
   * @param {import('./stats.js').Stats} o.stats
   * @param {() => boolean} o.requestKeyframe  sends {"t":"keyframe"}; false if it could not
   * @param {(text: string) => void} [o.onWarning]
   * @param {(w: number, h: number) => void} [o.onResize]
   * @param {string} [o.codec]  force this codec string instead of the one the SPS gives
   * @param {boolean} [o.readback]  canvas for frequent getImageData (tests, screenshots)
   */
  constructor(o) {
    this.canvas = o.canvas;
    this.stats = o.stats;
    this.requestKeyframe = o.requestKeyframe;
    this.onWarning = o.onWarning || (() => {});
    this.onResize = o.onResize || (() => {});
    this.forceCodec = o.codec || null;
    this.ctx = this.canvas.getContext('2d', { alpha: false, willReadFrequently: !!o.readback });
    this.decoder = null;
    this.config = null; // the config the decoder has now (null: unconfigured)
    this.supported = new Map(); // codec string -> Promise<string|null> (a usable codec string)
    this.checking = false; // waiting for isConfigSupported: packets go to this.pending
    this.pending = [];
    this.generation = 0; // bumped by reset(); stale async results are ignored
    this.captures = new Map(); // chunk timestamp (us) -> [capture time (s), arrival (performance.now ms)]
    this.lastKeyRequest = -Infinity;
    this.keyTimer = null;
    this.reset();
  }

  /** A new socket: its seq starts afresh and the first frame must be a keyframe. */
  reset() {
    this.generation++;
    this.expected = null;
    this.waitingKey = true;
    this.checking = false;
    this.pending = [];
    this.captures.clear();
    this.resetDecoder();
  }

  resetDecoder() {
    if (this.decoder && this.decoder.state !== 'closed') {
      try { this.decoder.reset(); } catch (e) { this.decoder = null; }
    }
    this.config = null;
  }

  close() {
    this.generation++;
    clearTimeout(this.keyTimer);
    if (this.decoder && this.decoder.state !== 'closed') this.decoder.close();
    this.decoder = null;
  }

  /** One binary WebSocket message. */
  push(buf) {
    let pkt;
    try {
      pkt = parseVideoPacket(buf);
    } catch (e) {
      this.lost(`bad video packet: ${e.message}`);
      return;
    }
    // the server says keyframe; believe it only if the data holds an IDR (a 'key' chunk that is
    // not an IDR makes the decoder fail, and a lying flag must not break the chain)
    const key = pkt.keyframe && isIdr(pkt.data);
    this.stats.onPacket(pkt.data.byteLength, key);
    if (this.expected !== null && pkt.seq !== this.expected) {
      this.stats.pub.gaps++;
      this.expected = pkt.seq + 1;
      if (!key) {
        this.lost(`gap in the stream (seq ${pkt.seq}, expected ${this.expected - 1})`);
        return;
      }
    }
    this.expected = pkt.seq + 1;
    if (this.waitingKey && !key) {
      this.stats.pub.dropped++;
      this.askForKeyframe();
      return;
    }
    if (key) {
      const want = this.forceCodec || codecFromSps(pkt.data) || FALLBACK_CODEC;
      const c = this.config;
      if (!c || c.requested !== want || c.codedWidth !== pkt.width || c.codedHeight !== pkt.height) {
        this.configure(want, pkt.width, pkt.height);
      }
    }
    if (this.checking) {
      if (this.pending.length >= MAX_PENDING) this.lost('decoder not ready');
      else this.pending.push({ pkt, key });
      return;
    }
    this.decode(pkt, key);
  }

  configure(codec, width, height) {
    this.resetDecoder();
    let check = this.supported.get(codec);
    if (!check) {
      check = pickCodec(codec, width, height);
      this.supported.set(codec, check);
    }
    this.checking = true;
    this.pending = [];
    const gen = this.generation;
    check.then((usable) => {
      if (gen !== this.generation) return;
      this.checking = false;
      const held = this.pending;
      this.pending = [];
      if (!usable) {
        this.onWarning(`this browser cannot decode the stream (${codec})`);
        this.lost(`unsupported codec ${codec}`, false);
        return;
      }
      if (usable !== codec) this.onWarning(`codec ${codec} not supported, using ${usable}`);
      this.apply({ codec: usable, requested: codec, codedWidth: width, codedHeight: height });
      for (const { pkt, key } of held) {
        if (this.waitingKey && !key) continue;
        this.decode(pkt, key);
      }
    });
  }

  apply(config) {
    if (!this.decoder || this.decoder.state === 'closed') {
      this.decoder = new VideoDecoder({
        output: (frame) => this.output(frame),
        error: (e) => this.decodeError(e),
      });
    }
    this.decoder.configure({
      codec: config.codec,
      codedWidth: config.codedWidth || undefined,
      codedHeight: config.codedHeight || undefined,
      optimizeForLatency: true,
      hardwareAcceleration: 'no-preference',
    });
    this.config = config;
    this.stats.pub.codec = config.codec;
  }

  decode(pkt, key) {
    if (!this.config || !this.decoder || this.decoder.state !== 'configured') {
      this.lost('decoder not configured');
      return;
    }
    if (!key && this.decoder.decodeQueueSize > MAX_DECODE_QUEUE) {
      this.lost('decoder is falling behind; skipping to the next keyframe');
      return;
    }
    const timestamp = pkt.pts * 1000; // microseconds; unique per socket (pts strictly increases)
    this.captures.set(timestamp, [pkt.captureTime, performance.now(), wallClock()]);
    if (this.captures.size > MAX_CAPTURES) this.captures.delete(this.captures.keys().next().value);
    try {
      this.decoder.decode(new EncodedVideoChunk({ type: key ? 'key' : 'delta', timestamp, data: pkt.data }));
      this.waitingKey = false;
    } catch (e) {
      this.stats.pub.decodeErrors++;
      this.lost(`decode failed: ${e.message}`);
    }
  }

  output(frame) {
    try {
      const decodedAt = performance.now(), decodedWall = wallClock();
      const ts = frame.timestamp;
      const [captureTime, arrived, arrivedWall] = this.captures.get(ts) || [0, null, null];
      // frames come out in order: anything older than this one will not come out any more
      for (const k of this.captures.keys()) {
        if (k > ts) break;
        this.captures.delete(k);
      }
      const w = frame.displayWidth, h = frame.displayHeight;
      if (this.canvas.width !== w || this.canvas.height !== h) {
        this.canvas.width = w;
        this.canvas.height = h;
        this.stats.pub.width = w;
        this.stats.pub.height = h;
        this.onResize(w, h);
      }
      this.ctx.drawImage(frame, 0, 0, w, h);
      this.stats.onFrame({
        captureTime,
        decodedWall,
        arrivedWall,
        decodeMs: arrived === null ? null : decodedAt - arrived,
        drawMs: performance.now() - decodedAt,
      });
    } finally {
      frame.close();
    }
  }

  decodeError(e) {
    // the decoder is closed now; a new one is made at the next keyframe
    this.stats.pub.decodeErrors++;
    this.decoder = null;
    this.config = null;
    this.lost(`decode error: ${e.message || e}`);
  }

  /** Drop everything until the next keyframe and ask for one. */
  lost(why, ask = true) {
    console.warn(`video: ${why}; waiting for a keyframe`);
    this.generation++; // a codec check still running must not configure behind our back
    this.waitingKey = true;
    this.pending = [];
    this.checking = false;
    this.resetDecoder();
    if (ask) this.askForKeyframe();
  }

  askForKeyframe() {
    const now = performance.now();
    const wait = this.lastKeyRequest + KEYFRAME_REQUEST_INTERVAL_MS - now;
    if (wait <= 0) {
      this.lastKeyRequest = now;
      if (this.requestKeyframe()) this.stats.pub.keyframeRequests++;
    } else if (this.keyTimer === null) {
      this.keyTimer = setTimeout(() => {
        this.keyTimer = null;
        if (this.waitingKey) this.askForKeyframe();
      }, wait);
    }
  }
}

/** A codec string this browser decodes for the stream: the SPS's own, else the fallbacks. */
async function pickCodec(codec, width, height) {
  const candidates = [codec, FALLBACK_CODEC, 'avc1.64002A'].filter((c, i, a) => a.indexOf(c) === i);
  for (const c of candidates) {
    try {
      const r = await VideoDecoder.isConfigSupported({
        codec: c, codedWidth: width || 1280, codedHeight: height || 720, optimizeForLatency: true,
      });
      if (r.supported) return c;
    } catch (e) {
      console.warn(`video: isConfigSupported(${c}) failed: ${e.message}`);
    }
  }
  return null;
}
