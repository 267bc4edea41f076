// Files: drag and drop onto the screen (or the Upload button) puts files into the session's
// ~/Uploads; the Downloads button lists ~/Downloads, each file a link that downloads it. Through
// the gateway's /files/* endpoints (client/web/files.py); sizes are capped there and on the node.
//
// window.cloudqStats.files: {uploads, uploaded (bytes), progress (0..1 of the current upload),
// lastPath, error}.

import { sidQuery } from './connection.js';

function button(text, title) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = text;
  b.title = title;
  return b;
}

export class FilePanel {
  /** @param {{stage: HTMLElement, bar: HTMLElement, before: HTMLElement, stats: object}} o */
  constructor(o) {
    this.stage = o.stage;
    this.bar = o.bar;
    this.before = o.before;
    this.s = { uploads: 0, uploaded: 0, progress: null, lastPath: null, error: null };
    o.stats.pub.files = this.s;
    this.box = document.createElement('span');
    this.box.id = 'files';
    this.input = document.createElement('input');
    this.input.type = 'file';
    this.input.multiple = true;
    this.input.hidden = true;
    this.input.id = 'upload-input';
    this.upBtn = button('Upload', 'Upload files into ~/Uploads (or drop them on the screen)');
    this.downBtn = button('Downloads', 'Files in ~/Downloads');
    this.note = document.createElement('span');
    this.note.id = 'files-note';
    this.list = document.createElement('ul');
    this.list.id = 'download-list';
    this.list.hidden = true;
    this.box.append(this.input, this.upBtn, this.downBtn, this.note, this.list);
    this.upBtn.addEventListener('click', () => this.input.click());
    this.input.addEventListener('change', () => this.uploadAll(this.input.files));
    this.downBtn.addEventListener('click', () => this.toggle());
    this.onDragOver = (e) => { if (e.dataTransfer && [...e.dataTransfer.types].includes('Files')) e.preventDefault(); };
    this.onDrop = (e) => {
      if (!e.dataTransfer || !e.dataTransfer.files.length) return;
      e.preventDefault();
      this.uploadAll(e.dataTransfer.files);
    };
  }

  attach() {
    this.bar.insertBefore(this.box, this.before);
    this.stage.addEventListener('dragover', this.onDragOver);
    this.stage.addEventListener('drop', this.onDrop);
  }

  detach() {
    this.stage.removeEventListener('dragover', this.onDragOver);
    this.stage.removeEventListener('drop', this.onDrop);
    this.box.remove();
  }

  url(path, params) {
    const q = sidQuery();
    return `${path}${q ? `${q}&` : '?'}${new URLSearchParams(params)}`;
  }

  async uploadAll(files) {
    for (const f of [...files]) {
      // one at a time: each is streamed through the gateway to the node
      // eslint-disable-next-line no-await-in-loop
      await this.upload(f);
    }
    this.input.value = '';
  }

  upload(file) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open('POST', this.url('/files/upload', { name: file.name }));
      xhr.setRequestHeader('Content-Type', 'application/octet-stream');
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable) return;
        this.s.progress = e.loaded / e.total;
        this.note.textContent = `uploading ${file.name}: ${Math.round(this.s.progress * 100)} %`;
      };
      xhr.onloadend = () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText || '{}'); } catch { /* not JSON */ }
        if (xhr.status === 200) {
          this.s.uploads++;
          this.s.uploaded += file.size;
          this.s.lastPath = body.path;
          this.s.error = null;
          this.note.textContent = `uploaded ~/${body.path}`;
        } else {
          this.s.error = body.error || `HTTP ${xhr.status}`;
          this.note.textContent = `upload of ${file.name} failed: ${this.s.error}`;
        }
        this.s.progress = null;
        resolve();
      };
      xhr.send(file);
    });
  }

  async toggle() {
    if (!this.list.hidden) { this.list.hidden = true; return; }
    this.list.replaceChildren();
    this.list.hidden = false;
    let body = {};
    try {
      const resp = await fetch(this.url('/files/list', { path: 'Downloads' }), { credentials: 'same-origin', cache: 'no-store' });
      body = await resp.json();
      if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    } catch (err) {
      const li = document.createElement('li');
      li.textContent = `~/Downloads: ${err.message}`;
      this.list.append(li);
      return;
    }
    if (!body.entries.length) {
      const li = document.createElement('li');
      li.textContent = '~/Downloads is empty';
      this.list.append(li);
    }
    for (const [name, size] of body.entries) {
      const li = document.createElement('li');
      const a = document.createElement('a');
      a.href = this.url('/files/download', { path: `Downloads/${name}` });
      a.download = name;
      a.textContent = `${name} (${size} bytes)`;
      li.append(a);
      this.list.append(li);
    }
  }
}
