// Keyboard, mouse and wheel on the canvas -> input events in stream pixel coordinates.

import { keysym } from './keys.js';

const WHEEL_PIXELS_PER_STEP = 100; // Chromium: 100 px per notch with deltaMode 0
const WHEEL_LINES_PER_STEP = 3;
const PASTE_WAIT_MS = 100; // how long a paste shortcut's keys wait for the browser's paste event
const ECHO_MS = 50; // an insertText right after a composition ended with the same text is its echo
export const MAX_CLIPBOARD_BYTES = 1024 * 1024; // cloudq/wire.py MAX_CLIPBOARD_BYTES

export class InputCapture {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {(type: string, fields: object) => boolean} send  false if the event was not sent
   */
  constructor(canvas, send, onClipboard = null) {
    this.canvas = canvas;
    this.send = send;
    this.onClipboard = onClipboard; // (text) => void: the browser's clipboard text, to the remote
    this.held = null; // key events of a paste shortcut, sent after the paste event's text
    this.heldTimer = null;
    this.keys = new Set(); // keysyms held down (released on blur)
    this.buttons = new Set();
    this.wheel = { x: 0, y: 0 };
    this.lastPos = null;
    this.handlers = [];
    // Text that comes without a key we forward (an IME's composition, dead keys, an on-screen
    // keyboard, dictation) needs an editable element with the focus: a transparent textarea over
    // the canvas takes it whenever the canvas would. Keys we forward are prevented on keydown, so
    // the textarea never sees them as text; what does reach it is sent as text and cleared.
    this.ime = document.createElement('textarea');
    this.ime.id = 'ime';
    for (const [k, v] of [['autocomplete', 'off'], ['autocorrect', 'off'], ['autocapitalize', 'off'],
      ['spellcheck', 'false'], ['aria-label', 'keyboard input for the remote screen']]) this.ime.setAttribute(k, v);
    this.composing = false;
    this.composed = null; // [text, time] of the last composition sent
  }

  /** Whether keys typed now are meant for the remote screen. */
  focused() {
    const a = document.activeElement;
    return a === this.canvas || a === this.ime;
  }

  attach() {
    const c = this.canvas;
    c.tabIndex = 0;
    if (c.parentElement && !this.ime.isConnected) c.after(this.ime);
    this.on(c, 'focus', (e) => {
      this.ime.focus({ preventScroll: true });
      if (e.relatedTarget !== this.ime) this.readClipboard(); // back from elsewhere
    });
    this.on(this.ime, 'compositionstart', () => { this.composing = true; });
    this.on(this.ime, 'compositionend', (e) => this.compositionEnd(e));
    this.on(this.ime, 'beforeinput', (e) => this.beforeInput(e));
    this.on(this.ime, 'input', () => { if (!this.composing) this.ime.value = ''; });
    // focus moving between the canvas and the textarea is no focus change for the remote screen
    this.on(this.ime, 'blur', (e) => { if (e.relatedTarget !== c) this.releaseAll(); });
    this.on(document, 'keydown', (e) => this.key(e, 'key_down'));
    this.on(document, 'keyup', (e) => this.key(e, 'key_up'));
    this.on(c, 'pointerdown', (e) => this.pointerDown(e));
    this.on(c, 'pointermove', (e) => this.pointerMove(e));
    this.on(c, 'pointerup', (e) => this.pointerUp(e));
    this.on(c, 'pointercancel', (e) => this.pointerUp(e));
    this.on(c, 'wheel', (e) => this.onWheel(e), { passive: false });
    this.on(c, 'contextmenu', (e) => e.preventDefault());
    this.on(document, 'paste', (e) => this.paste(e));
    this.on(this.ime, 'focus', (e) => { if (e.relatedTarget !== c) this.readClipboard(); });
    this.on(window, 'blur', () => this.releaseAll());
  }

  detach() {
    this.flushHeld();
    this.releaseAll();
    for (const [target, type, fn, opts] of this.handlers) target.removeEventListener(type, fn, opts);
    this.handlers = [];
    this.ime.remove();
  }

  /** An IME (or a dead key) finished composing: its text goes as text. */
  compositionEnd(e) {
    this.composing = false;
    const text = e.data || '';
    this.ime.value = '';
    if (!text) return;
    this.composed = [text, performance.now()];
    this.sendText(text);
  }

  /** Text inserted without a composition (on-screen keyboards, dictation, CDP insertText). */
  beforeInput(e) {
    if (e.isComposing || this.composing || e.inputType === 'insertCompositionText') return;
    e.preventDefault(); // the textarea stays empty; nothing but text is forwarded from here
    if (e.inputType !== 'insertText' || !e.data) return;
    const echo = this.composed && this.composed[0] === e.data && performance.now() - this.composed[1] < ECHO_MS;
    this.composed = null;
    if (!echo) this.sendText(e.data);
  }

  sendText(text) {
    for (let i = 0; i < text.length; i += 1000) this.send('text', { text: text.slice(i, i + 1000) });
  }

  on(target, type, fn, opts = undefined) {
    target.addEventListener(type, fn, opts);
    this.handlers.push([target, type, fn, opts]);
  }

  key(e, type) {
    if (!this.focused() || e.isComposing) return;
    const k = keysym(e);
    if (k === null) return;
    const paste = type === 'key_down' && this.onClipboard && isPasteShortcut(e);
    // a paste shortcut goes on to the browser (its paste event carries the text), the rest not
    if (!paste) e.preventDefault(); // no browser shortcuts, scrolling or focus moves while in the stream
    if (type === 'key_down') this.keys.add(k);
    else if (!this.keys.delete(k)) return; // the press went elsewhere: do not send a lone release
    if (paste && !this.held) {
      this.held = [];
      this.heldTimer = setTimeout(() => this.flushHeld(), PASTE_WAIT_MS);
    }
    if (this.held) this.held.push([type, { key: k }]);
    else this.send(type, { key: k });
  }

  flushHeld() {
    clearTimeout(this.heldTimer);
    const held = this.held || [];
    this.held = null;
    for (const [type, fields] of held) this.send(type, fields);
  }

  /** The browser's paste (Ctrl+V, a menu): its text becomes the remote clipboard first. */
  paste(e) {
    if (!this.focused() || !this.onClipboard) return;
    const text = e.clipboardData ? e.clipboardData.getData('text/plain') : '';
    e.preventDefault();
    if (text) this.onClipboard(text);
    this.flushHeld();
  }

  /** Back on the canvas: the browser's clipboard may have changed (needs the read permission). */
  readClipboard() {
    if (!this.onClipboard || !navigator.clipboard || !navigator.clipboard.readText) return;
    navigator.clipboard.readText().then(
      (text) => { if (text) this.onClipboard(text); },
      () => {}, // not permitted: the paste event still works
    );
  }

  /** Client coordinates -> stream pixels (the canvas is CSS-scaled to fit the window). */
  position(e) {
    const c = this.canvas;
    const r = c.getBoundingClientRect();
    if (r.width <= 0 || r.height <= 0) return null;
    const x = Math.floor(((e.clientX - r.left) * c.width) / r.width);
    const y = Math.floor(((e.clientY - r.top) * c.height) / r.height);
    this.lastPos = { x: Math.min(Math.max(x, 0), c.width - 1), y: Math.min(Math.max(y, 0), c.height - 1) };
    return this.lastPos;
  }

  pointerDown(e) {
    if (e.button < 0 || e.button > 2) return;
    e.preventDefault();
    if (!this.focused()) this.ime.focus({ preventScroll: true });
    try { this.canvas.setPointerCapture(e.pointerId); } catch { /* synthetic event */ }
    const p = this.position(e);
    if (!p) return;
    this.buttons.add(e.button + 1);
    this.send('mouse_down', { ...p, button: e.button + 1 });
  }

  pointerMove(e) {
    const p = this.position(e);
    if (p) this.send('mouse_move', p);
  }

  pointerUp(e) {
    if (e.button < 0 || e.button > 2) return;
    const button = e.button + 1;
    if (!this.buttons.delete(button)) return;
    e.preventDefault();
    const p = this.position(e);
    if (p) this.send('mouse_up', { ...p, button });
  }

  onWheel(e) {
    e.preventDefault();
    const per = e.deltaMode === 0 ? WHEEL_PIXELS_PER_STEP : e.deltaMode === 1 ? WHEEL_LINES_PER_STEP : 1;
    this.wheel.x += e.deltaX / per;
    this.wheel.y += e.deltaY / per; // DOM: positive deltaY = scrolling down = positive dy
    const dx = Math.trunc(this.wheel.x), dy = Math.trunc(this.wheel.y);
    if (!dx && !dy) return;
    this.wheel.x -= dx;
    this.wheel.y -= dy;
    const p = this.position(e);
    this.send('wheel', { ...(p || {}), dx: clampSteps(dx), dy: clampSteps(dy) });
  }

  releaseAll() {
    for (const k of this.keys) this.send('key_up', { key: k });
    this.keys.clear();
    for (const b of this.buttons) this.send('mouse_up', { ...(this.lastPos || { x: 0, y: 0 }), button: b });
    this.buttons.clear();
  }
}

function isPasteShortcut(e) {
  const v = e.key === 'v' || e.key === 'V';
  return ((e.ctrlKey || e.metaKey) && !e.altKey && v) || (e.shiftKey && e.key === 'Insert');
}

function clampSteps(n) {
  return Math.max(-100, Math.min(100, n));
}
