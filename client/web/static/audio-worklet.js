// The audio output: decoded PCM (f32 planar, posted by audio.js) -> a small jitter buffer -> the
// speakers. Output starts once `target` frames are buffered (and again after the buffer ran dry);
// more than `target + slack` buffered (a burst after a stall) drops the oldest down to `target`,
// so latency never builds up. Reports its state to audio.js about ten times a second.

class CloudqAudio extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.target = o.targetFrames || 2400;
    this.slack = o.slackFrames || 7200;
    this.queue = []; // [left, right] Float32Arrays, oldest first
    this.offset = 0; // frames of queue[0] already played
    this.buffered = 0;
    this.playing = false;
    this.underruns = 0;
    this.dropped = 0;
    this.played = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.push(e.data);
  }

  push(planes) {
    this.queue.push(planes);
    this.buffered += planes[0].length;
    if (this.buffered > this.target + this.slack) {
      while (this.queue.length > 1 && this.buffered - (this.queue[0][0].length - this.offset) >= this.target) {
        this.buffered -= this.queue[0][0].length - this.offset;
        this.dropped += this.queue[0][0].length - this.offset;
        this.queue.shift();
        this.offset = 0;
      }
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const n = out[0].length;
    if (!this.playing && this.buffered >= this.target) this.playing = true;
    if (this.playing) {
      let i = 0;
      while (i < n && this.queue.length) {
        const [l, r] = this.queue[0];
        const take = Math.min(n - i, l.length - this.offset);
        out[0].set(l.subarray(this.offset, this.offset + take), i);
        if (out.length > 1) out[1].set((r || l).subarray(this.offset, this.offset + take), i);
        i += take;
        this.offset += take;
        this.buffered -= take;
        this.played += take;
        if (this.offset >= l.length) {
          this.queue.shift();
          this.offset = 0;
        }
      }
      if (i < n) {
        this.playing = false; // ran dry: wait for `target` frames again
        this.underruns++;
      }
    }
    this.sinceReport += n;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({
        buffered: this.buffered, played: this.played, underruns: this.underruns, dropped: this.dropped,
      });
    }
    return true;
  }
}

registerProcessor('cloudq-audio', CloudqAudio);
