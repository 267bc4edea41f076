// Wire format shared with client/web/socket.py (the protocol: client/web/__init__.py). Binary server -> client messages are video packets:
//
//   off size  field
//     0  u8   type          1 = video
//     1  u8   flags         bit 0: keyframe (IDR)
//     2  u16  width         stream width in pixels (0: not known yet)
//     4  u16  height        stream height in pixels
//     6  u16  reserved      0
//     8  u64  seq           the node's packet counter (a jump means loss)
//    16  i64  pts           milliseconds
//    24  f64  capture time  seconds since the epoch when the node rendered the frame
//    32  ...  data          one H.264 access unit, Annex B (start codes, SPS/PPS before each IDR)
//
// All little-endian. Text messages are JSON control messages ({"t": ...}).

export const MSG_VIDEO = 1;
export const FLAG_KEYFRAME = 0x01;
export const HEADER_BYTES = 32;
export const FALLBACK_CODEC = 'avc1.42E01F';

export class ProtocolError extends Error {}

/** ArrayBuffer -> {seq, pts, keyframe, captureTime, width, height, data: Uint8Array}. */
export function parseVideoPacket(buf) {
  if (!(buf instanceof ArrayBuffer) || buf.byteLength <= HEADER_BYTES) {
    throw new ProtocolError(`video packet too short (${buf?.byteLength ?? 0} bytes)`);
  }
  const v = new DataView(buf);
  const type = v.getUint8(0);
  if (type !== MSG_VIDEO) throw new ProtocolError(`unknown binary message type ${type}`);
  const seq = v.getBigUint64(8, true);
  const pts = v.getBigInt64(16, true);
  return {
    keyframe: (v.getUint8(1) & FLAG_KEYFRAME) !== 0,
    width: v.getUint16(2, true),
    height: v.getUint16(4, true),
    seq: Number(seq), // exact below 2^53: ~285 million years at 1000 fps
    pts: Number(pts),
    captureTime: v.getFloat64(24, true),
    data: new Uint8Array(buf, HEADER_BYTES),
  };
}

/** NAL unit types of an Annex B access unit, up to and including its first slice. */
export function nalTypes(data) {
  const types = [];
  const n = data.length;
  for (let i = 0; i + 3 < n; i++) {
    if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1) {
      const t = data[i + 3] & 0x1f;
      types.push(t);
      if (t >= 1 && t <= 5) break; // first VCL NAL: the rest is slice data
      i += 3;
    }
  }
  return types;
}

/** True if the access unit holds an IDR slice (NAL type 5): what WebCodecs accepts as 'key'. */
export function isIdr(data) {
  return nalTypes(data).includes(5);
}

/** 'avc1.PPCCLL' from the first SPS (NAL type 7) in the access unit, or null. */
export function codecFromSps(data) {
  const n = data.length;
  for (let i = 0; i + 6 < n; i++) {
    if (data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 1) {
      const t = data[i + 3] & 0x1f;
      if (t === 7) {
        const hex = (b) => b.toString(16).toUpperCase().padStart(2, '0');
        return `avc1.${hex(data[i + 4])}${hex(data[i + 5])}${hex(data[i + 6])}`;
      }
      if (t >= 1 && t <= 5) return null;
      i += 3;
    }
  }
  return null;
}
