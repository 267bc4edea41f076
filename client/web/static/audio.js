// Audio: binary packets of type 2 (Opus, 20 ms each; layout in client/web/__init__.py) ->
// WebCodecs AudioDecoder -> an AudioWorklet with a small jitter buffer (audio-worklet.js).
//
// window.cloudqStats.audio: frames (decoded), packets, level (RMS of the last ~100 ms, 0..1),
// lateMs (capture on the node -> leaving the speakers: transit + decode + the worklet's buffer +
// the output's own latency; wall clocks, so across hosts as good as their sync), decodedMs
// (capture -> decoded), bufferedMs, played (frames the worklet output), underruns, dropped, state
// (the AudioContext's: browsers start it 'suspended' until the user clicks or types on the page),
// onsets (the last 64 sounds after silence: [capture time (s), decoded (s, wall clock), ms until
// the speakers], for `cloudq bench audio`).

import { wallClock } from './stats.js';

const HEADER = 32;
const TARGET_MS = 40; // the jitter buffer the worklet fills before it plays
const SLACK_MS = 120; // buffered beyond the target: the oldest is dropped
const LEVEL_SMOOTH = 0.2; // per 20 ms frame: about 100 ms
const FRAME_SAMPLES = 960; // one Opus packet: 20 ms at 48 kHz (cloudq/codec.py AUDIO_FRAME)
const ONSET = 0.05; // RMS of a frame that is sound after silence

export class AudioPipe {
  /** @param {{stats: import('./stats.js').Stats}} o */
  constructor(o) {
    this.stats = o.stats;
    this.a = {
      frames: 0, packets: 0, gaps: 0, level: 0, lateMs: null, decodedMs: null, bufferedMs: 0,
      played: 0, underruns: 0, dropped: 0, errors: 0, state: 'off', onsets: [],
    };
    this.quiet = true;
    this.stats.pub.audio = this.a;
    this.decoder = null;
    this.config = '';
    this.ctx = null;
    this.node = null;
    this.lastSeq = null;
    this.nextTs = 0;
    this.captures = new Map(); // timestamp (us) -> capture time (s)
    this.bufferedMs = 0;
    this.outputMs = 0;
    this.unlock = () => this.resume();
    for (const ev of ['pointerdown', 'keydown']) document.addEventListener(ev, this.unlock, true);
  }

  /** One binary WebSocket message of type 2. */
  push(buf) {
    if (buf.byteLength <= HEADER) return;
    const v = new DataView(buf);
    const channels = v.getUint8(2);
    const rate = v.getUint32(4, true);
    const seq = Number(v.getBigUint64(8, true));
    const ts = Number(v.getBigInt64(16, true));
    const captured = v.getFloat64(24, true);
    this.a.packets++;
    // a packet lost (seq) or silence the node did not send (the timestamp jumps)
    const gap = this.lastSeq !== null && (seq !== this.lastSeq + 1 || Math.abs(ts - this.nextTs) > 1000);
    if (gap) this.a.gaps++;
    this.lastSeq = seq;
    this.nextTs = ts + (FRAME_SAMPLES / rate) * 1e6;
    if (typeof AudioDecoder === 'undefined') { this.a.state = 'unsupported'; return; }
    const config = `${rate}/${channels}`;
    // after a gap a fresh decoder: a decoder numbers its output on from its first input, so its
    // timestamps would no longer name the packets' own
    if (gap || !this.decoder || this.decoder.state === 'closed' || this.config !== config) {
      this.open(rate, channels);
      this.config = config;
    }
    if (this.captures.size > 256) this.captures.clear();
    this.captures.set(ts, captured);
    try {
      this.decoder.decode(new EncodedAudioChunk({ type: 'key', timestamp: ts, data: new Uint8Array(buf, HEADER) }));
    } catch {
      this.a.errors++;
      this.decoder = null;
    }
  }

  open(rate, channels) {
    if (this.decoder && this.decoder.state !== 'closed') this.decoder.close();
    this.decoder = new AudioDecoder({
      output: (d) => this.onData(d),
      error: () => { this.a.errors++; this.decoder = null; },
    });
    this.decoder.configure({ codec: 'opus', sampleRate: rate, numberOfChannels: channels });
    if (!this.ctx) this.startOutput(rate);
  }

  async startOutput(rate) {
    try {
      this.ctx = new AudioContext({ sampleRate: rate, latencyHint: 'interactive' });
      this.ctx.onstatechange = () => { this.a.state = this.ctx ? this.ctx.state : 'off'; };
      this.a.state = this.ctx.state;
      await this.ctx.audioWorklet.addModule('/static/audio-worklet.js');
      if (!this.ctx) return;
      this.node = new AudioWorkletNode(this.ctx, 'cloudq-audio', {
        numberOfInputs: 0,
        outputChannelCount: [2],
        processorOptions: { targetFrames: (rate * TARGET_MS) / 1000, slackFrames: (rate * SLACK_MS) / 1000 },
      });
      this.node.port.onmessage = (e) => {
        const m = e.data;
        this.bufferedMs = (m.buffered / rate) * 1000;
        this.a.bufferedMs = Math.round(this.bufferedMs * 10) / 10;
        Object.assign(this.a, { played: m.played, underruns: m.underruns, dropped: m.dropped });
      };
      this.node.connect(this.ctx.destination);
      this.outputMs = ((this.ctx.baseLatency || 0) + (this.ctx.outputLatency || 0)) * 1000;
    } catch (err) {
      this.a.state = `failed: ${err.message}`;
    }
  }

  /** A user gesture: browsers let an AudioContext play only after one. */
  resume() {
    if (this.ctx && this.ctx.state === 'suspended') this.ctx.resume().catch(() => {});
  }

  onData(d) {
    const n = d.numberOfFrames;
    const planes = [];
    for (let c = 0; c < 2; c++) {
      const p = new Float32Array(n);
      d.copyTo(p, { planeIndex: Math.min(c, d.numberOfChannels - 1), format: 'f32-planar' });
      planes.push(p);
    }
    const captured = this.captures.get(d.timestamp);
    this.captures.delete(d.timestamp);
    d.close();
    let sum = 0;
    for (const x of planes[0]) sum += x * x;
    const rms = Math.sqrt(sum / Math.max(1, n));
    this.a.level = Math.round((this.a.level * (1 - LEVEL_SMOOTH) + rms * LEVEL_SMOOTH) * 1e4) / 1e4;
    this.a.frames++;
    if (captured) {
      const now = wallClock();
      const decoded = (now - captured) * 1000;
      this.a.decodedMs = Math.round(decoded * 10) / 10;
      this.a.lateMs = Math.round((decoded + this.bufferedMs + this.outputMs) * 10) / 10;
      if (this.quiet && rms > ONSET) {
        // from empty, the worklet first fills its target
        this.a.onsets.push([captured, now, Math.max(this.bufferedMs, TARGET_MS) + this.outputMs]);
        if (this.a.onsets.length > 64) this.a.onsets.shift();
      }
    }
    if (rms > ONSET) this.quiet = false;
    else if (rms < ONSET / 10) this.quiet = true;
    if (this.node && this.ctx && this.ctx.state === 'running') {
      this.node.port.postMessage(planes, [planes[0].buffer, planes[1].buffer]);
    }
  }

  close() {
    for (const ev of ['pointerdown', 'keydown']) document.removeEventListener(ev, this.unlock, true);
    if (this.decoder && this.decoder.state !== 'closed') this.decoder.close();
    this.decoder = null;
    if (this.ctx) this.ctx.close().catch(() => {});
    this.ctx = null;
    this.node = null;
  }
}
