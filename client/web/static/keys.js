// KeyboardEvent.key -> X keysym name (what the node's input injection expects).

const NAMED = {
  Enter: 'Return', Backspace: 'BackSpace', Tab: 'Tab', Escape: 'Escape', Delete: 'Delete',
  Insert: 'Insert', Home: 'Home', End: 'End', PageUp: 'Prior', PageDown: 'Next',
  ArrowLeft: 'Left', ArrowRight: 'Right', ArrowUp: 'Up', ArrowDown: 'Down',
  Shift: 'Shift_L', Control: 'Control_L', Alt: 'Alt_L', AltGraph: 'ISO_Level3_Shift',
  Meta: 'Super_L', OS: 'Super_L', CapsLock: 'Caps_Lock', NumLock: 'Num_Lock',
  ScrollLock: 'Scroll_Lock', Pause: 'Pause', PrintScreen: 'Print', ContextMenu: 'Menu',
};

// right-hand modifiers, told apart by KeyboardEvent.code
const RIGHT = { Shift: 'Shift_R', Control: 'Control_R', Alt: 'Alt_R', Meta: 'Super_R', OS: 'Super_R' };

const PUNCT = {
  ' ': 'space', '!': 'exclam', '"': 'quotedbl', '#': 'numbersign', '$': 'dollar', '%': 'percent',
  '&': 'ampersand', "'": 'apostrophe', '(': 'parenleft', ')': 'parenright', '*': 'asterisk',
  '+': 'plus', ',': 'comma', '-': 'minus', '.': 'period', '/': 'slash', ':': 'colon',
  ';': 'semicolon', '<': 'less', '=': 'equal', '>': 'greater', '?': 'question', '@': 'at',
  '[': 'bracketleft', '\\': 'backslash', ']': 'bracketright', '^': 'asciicircum',
  '_': 'underscore', '`': 'grave', '{': 'braceleft', '|': 'bar', '}': 'braceright',
  '~': 'asciitilde', '£': 'sterling', '§': 'section', '°': 'degree', '€': 'EuroSign',
};

/** The keysym name for a KeyboardEvent, or null for keys we do not forward (dead keys, IME). */
export function keysym(event) {
  const key = event.key;
  if (!key || key === 'Unidentified' || key === 'Dead' || key === 'Process') return null;
  if (key in RIGHT && event.code && event.code.endsWith('Right')) return RIGHT[key];
  if (key in NAMED) return NAMED[key];
  if (/^F([1-9]|1[0-9]|2[0-4])$/.test(key)) return key;
  if (key in PUNCT) return PUNCT[key];
  if (/^[A-Za-z0-9]$/.test(key)) return key;
  // other single characters (letters with accents, ...): X has keysyms named after most
  // Latin-1 characters, and 'U+XXXX' style names for the rest
  if ([...key].length === 1) {
    const cp = key.codePointAt(0);
    if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0)) return null;
    return cp <= 0xff ? key : `U${cp.toString(16).toUpperCase().padStart(4, '0')}`;
  }
  return null; // other named keys (media keys, ...) are not forwarded
}
