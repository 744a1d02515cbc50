"""An independent check of virtrigaud's streamed PVE upload: a tiny HTTP server that parses
the multipart/form-data body with Python's standard `email` parser (not our code) and records
what it saw. It answers just enough of the PVE API for an upload to run: /version, /nodes,
storage content (the files it received), the upload (POST .../upload -> a UPID), the task
status (always OK) and deleting a volume. It is not PVE: it proves the bytes on the wire.

    multipart_server.py OUTDIR [UPSTREAM]   # prints the port, then serves on 127.0.0.1

With UPSTREAM (a fakepve URL), every request it does not answer itself is forwarded there
unchanged (headers, body, status), so a whole migration can run against fakepve while the
upload, which fakepve refuses for content=import, lands here.
Per upload it writes OUTDIR/<filename> (the file part) and OUTDIR/<filename>.json:
{"fields": [names in order], "values": {name: value}, "content_length": int or null,
 "chunked": bool, "body_len": int, "file_size": int, "sha256": hex, "checksum_ok": bool or null}

A VM create (`POST .../qemu`) whose drives carry `import-from=STORAGE:import/FILE` is
forwarded; when UPSTREAM accepts it, this server does what PVE's import would (fakepve allocates
the volume but writes nothing): it reads the new VM's config from UPSTREAM and converts
OUTDIR/FILE with `qemu-img convert` into the file the `pvesm` stand-in serves for that volume
(`ROOT/images/NAME` for `local:`, `ROOT/STORAGE/NAME` otherwise, ROOT being OUTDIR/../..; raw
unless the volume name says qcow2), so the imported VM can be exported again over SSH.

Every request sent on to UPSTREAM is recorded as one JSON line {"method", "path", "status"} in
OUTDIR/requests.json (logins are `POST /api2/json/access/ticket`), so a test can count logins
and 401 answers; the record changes nothing.

Task rewriting (fakepve finishes every task at once and never ends one with warnings): when
OUTDIR/task-overrides.json exists, mapping a task type (the UPID's fifth field, e.g. `qmcreate`)
to an override, the status and log of every task of that type are first fetched from UPSTREAM
(the task is real and has really finished there) and then altered before they are answered:
{"exitstatus": "WARNINGS: 2"} replaces the exit status; {"running": true} answers
`status: running` without an exit status, forever; {"log": [lines]} appends lines to the real
task log. Nothing else is changed.

A `download-url` POST is first forwarded to UPSTREAM (which checks its parameters against PVE's
schema and runs a task, but fetches nothing); when UPSTREAM accepts it, this server does what
PVE would: it fetches the URL with no credentials of its own, checks the SHA-256 it was given,
and stores the file as OUTDIR/<filename>, with OUTDIR/<filename>.json:
{"pulled": true, "url_scheme": str, "url_signed": bool, "file_size": int, "sha256": hex,
 "checksum_ok": bool or null}. A fetch that fails or a checksum that differs answers 500.
"""

import email.parser
import email.policy
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUT = sys.argv[1]
UPSTREAM = sys.argv[2].rstrip('/') if len(sys.argv) > 2 else None
UPID = 'UPID:pve1:00001234:00005678:6B112093:imgcopy::root@pam!virtrigaud:'


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        pass

    def answer(self, status, data, message=None):
        body = {'data': data}
        if message:
            body['message'] = message
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def forward(self, body=None):
        """Send the request on to UPSTREAM unchanged; True when it did."""
        if not UPSTREAM:
            return False
        if body is None and self.headers.get('Content-Length'):
            body = self.rfile.read(int(self.headers['Content-Length']))
        req = urllib.request.Request(UPSTREAM + self.path, data=body, method=self.command)
        for k in ('Authorization', 'Cookie', 'CSRFPreventionToken', 'Content-Type'):
            if self.headers.get(k):
                req.add_header(k, self.headers[k])
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a test fake on loopback behind this test server
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        self.record(self.command, self.path, status)
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        return True

    def task_override(self, path):
        """Answer a task's status or log from UPSTREAM, altered per task-overrides.json."""
        m = re.fullmatch(r'/api2/json/nodes/[\w-]+/tasks/([^/]+)/(status|log)', path)
        overrides_file = os.path.join(OUT, 'task-overrides.json')
        if not (UPSTREAM and m and os.path.exists(overrides_file)):
            return False
        upid = urllib.parse.unquote(m.group(1))
        fields = upid.split(':')
        with open(overrides_file) as f:
            override = json.load(f).get(fields[5] if len(fields) > 5 else '')
        if override is None:
            return False
        status, raw = self.upstream('GET', self.path)
        if status != 200:
            return False
        data = json.loads(raw)['data']
        if m.group(2) == 'status':
            if override.get('running'):
                data['status'] = 'running'
                data.pop('exitstatus', None)
            elif 'exitstatus' in override:
                data['exitstatus'] = override['exitstatus']
        else:
            n = len(data)
            data = data + [{'n': n + 1 + i, 't': t} for i, t in enumerate(override.get('log', []))]
        self.answer(200, data)
        return True

    def do_GET(self):
        path = self.path.split('?')[0]
        query = self.path.split('?')[1] if '?' in self.path else ''
        if self.task_override(path):
            return
        if UPSTREAM and not (path.endswith('/content') and 'content=import' in query) \
                and not (path.endswith('/status') and 'imgcopy' in path):
            self.forward()
            return
        if path == '/api2/json/version':
            return self.answer(200, {'version': '9.0.10', 'release': '9.0'})
        if path == '/api2/json/nodes':
            return self.answer(200, [{'node': 'pve1', 'status': 'online'}])
        m = re.fullmatch(r'/api2/json/nodes/pve1/storage/([\w-]+)/content', path)
        if m:
            files = sorted(f for f in os.listdir(OUT) if not f.endswith('.json'))
            return self.answer(200, [{'volid': '{0}:import/{1}'.format(m.group(1), f), 'content': 'import',
                                      'size': os.path.getsize(os.path.join(OUT, f))} for f in files])
        if re.fullmatch(r'/api2/json/nodes/pve1/tasks/[^/]+/status', path):
            return self.answer(200, {'status': 'stopped', 'exitstatus': 'OK'})
        return self.answer(501, None, 'Method not implemented')

    def do_DELETE(self):
        m = re.fullmatch(r'/api2/json/nodes/pve1/storage/[\w-]+/content/[\w-]+%3Aimport%2F([\w.-]+)',
                         self.path.split('?')[0])
        if not m:
            if not self.forward():
                self.answer(501, None, 'Method not implemented')
            return
        p = os.path.join(OUT, m.group(1))
        if not os.path.exists(p):
            return self.answer(500, None, 'volume does not exist')
        os.remove(p)
        return self.answer(200, None)

    def pull(self):
        """download-url: forward for the schema check, then fetch the URL as PVE would."""
        length = int(self.headers.get('Content-Length') or 0)
        raw = self.rfile.read(length)
        form = dict(urllib.parse.parse_qsl(raw.decode()))
        if not UPSTREAM:
            return self.answer(501, None, 'download-url needs an upstream')
        # Forward, capturing the answer instead of sending it.
        req = urllib.request.Request(UPSTREAM + self.path, data=raw, method='POST')
        for k in ('Authorization', 'Cookie', 'CSRFPreventionToken', 'Content-Type'):
            if self.headers.get(k):
                req.add_header(k, self.headers[k])
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a test fake on loopback behind this test server
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                status, upstream = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, upstream = e.code, e.read()
        self.record('POST', self.path, status)
        if status != 200:
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(upstream)))
            self.end_headers()
            self.wfile.write(upstream)
            return
        filename, url = form.get('filename', ''), form.get('url', '')
        if not filename or '/' in filename:
            return self.answer(400, None, 'bad filename')
        sha, size = hashlib.sha256(), 0
        try:
            with urllib.request.urlopen(url) as r, open(os.path.join(OUT, filename), 'wb') as f:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    sha.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        except Exception as e:  # noqa: BLE001 - any fetch failure fails the task, as on PVE
            if os.path.exists(os.path.join(OUT, filename)):
                os.remove(os.path.join(OUT, filename))
            return self.answer(500, None, 'download failed: {0}'.format(type(e).__name__))
        ok = None
        if 'checksum' in form:
            ok = form.get('checksum-algorithm') == 'sha256' and form['checksum'] == sha.hexdigest()
        query = urllib.parse.urlparse(url).query
        with open(os.path.join(OUT, filename + '.json'), 'w') as f:
            json.dump({'pulled': True, 'url_scheme': urllib.parse.urlparse(url).scheme,
                       'url_signed': 'X-Amz-Signature=' in query, 'file_size': size,
                       'sha256': sha.hexdigest(), 'checksum_ok': ok}, f)
        if ok is False:
            os.remove(os.path.join(OUT, filename))
            return self.answer(500, None, 'checksum mismatch')
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(upstream)))
        self.end_headers()
        self.wfile.write(upstream)

    def upstream(self, method, path, body=None):
        """One request to UPSTREAM with this request's credentials: (status, raw body)."""
        req = urllib.request.Request(UPSTREAM + path, data=body, method=method)
        for k in ('Authorization', 'Cookie', 'CSRFPreventionToken', 'Content-Type'):
            if self.headers.get(k) and (body is not None or k != 'Content-Type'):
                req.add_header(k, self.headers[k])
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a test fake on loopback behind this test server
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        self.record(method, path, status)
        return status, raw

    def record(self, method, path, status):
        """One line per request sent to UPSTREAM, in OUTDIR/requests.json."""
        with open(os.path.join(OUT, 'requests.json'), 'a') as f:
            f.write(json.dumps({'method': method, 'path': path.split('?')[0], 'status': status}) + '\n')

    def create_vm(self):
        """Forward a VM create, then import its `import-from` drives as PVE would."""
        length = int(self.headers.get('Content-Length') or 0)
        raw = self.rfile.read(length)
        form = dict(urllib.parse.parse_qsl(raw.decode()))
        status, answer = self.upstream('POST', self.path, raw)
        if status == 200:
            imports = {}
            for key, value in form.items():
                m = re.search(r'(?:^|,)import-from=[\w-]+:import/([\w.-]+)', value)
                if re.fullmatch(r'(scsi|virtio|sata|ide)\d+', key) and m:
                    imports[key] = m.group(1)
            # Only where OUTDIR is the stand-in's ROOT/images/import (never outside ROOT).
            if imports and os.path.abspath(OUT).endswith(os.path.join('images', 'import')):
                st, conf = self.upstream('GET', '/api2/json/nodes/pve1/qemu/{0}/config'.format(form['vmid']))
                conf = json.loads(conf)['data'] if st == 200 else {}
                root = os.path.dirname(os.path.dirname(os.path.abspath(OUT)))
                for key, filename in imports.items():
                    volid = conf.get(key, '').split(',')[0]
                    store, _, name = volid.partition(':')
                    if not name or '..' in name:
                        continue
                    dest = os.path.join(root, 'images', name) if store == 'local' else os.path.join(root, store, name)
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    fmt = 'qcow2' if name.endswith('.qcow2') else 'raw'
                    subprocess.run(['qemu-img', 'convert', '-O', fmt, os.path.join(OUT, filename), dest], check=True)
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def do_POST(self):
        if re.fullmatch(r'/api2/json/nodes/pve1/storage/[\w-]+/download-url', self.path):
            return self.pull()
        if UPSTREAM and re.fullmatch(r'/api2/json/nodes/pve1/qemu', self.path):
            return self.create_vm()
        if not re.fullmatch(r'/api2/json/nodes/pve1/storage/[\w-]+/upload', self.path):
            if not self.forward():
                self.answer(501, None, 'Method not implemented')
            return
        chunked = 'chunked' in self.headers.get('Transfer-Encoding', '')
        length = self.headers.get('Content-Length')
        if chunked or length is None:
            # PVE's proxy needs a Content-Length; refuse like it would.
            self.close_connection = True
            return self.answer(501, None, 'chunked transfer encoding not supported')
        body = b''
        want = int(length)
        while len(body) < want:
            part = self.rfile.read(min(1 << 20, want - len(body)))
            if not part:
                break
            body += part
        if len(body) != want:
            self.close_connection = True
            return self.answer(400, None, 'short body')
        head = 'Content-Type: {0}\r\nMIME-Version: 1.0\r\n\r\n'.format(self.headers['Content-Type']).encode()
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not msg.is_multipart():
            return self.answer(400, None, 'not multipart')
        fields, values, data, filename = [], {}, None, None
        for part in msg.iter_parts():
            name = part.get_param('name', header='content-disposition')
            fields.append(name)
            fn = part.get_param('filename', header='content-disposition')
            if fn is not None:
                filename, data = fn, part.get_payload(decode=True)
            else:
                values[name] = part.get_payload(decode=True).decode()
        if data is None or not filename or '/' in filename:
            return self.answer(400, None, 'no file part')
        sha = hashlib.sha256(data).hexdigest()
        ok = None
        if 'checksum' in values:
            ok = values.get('checksum-algorithm') == 'sha256' and values['checksum'] == sha
        with open(os.path.join(OUT, filename), 'wb') as f:
            f.write(data)
        with open(os.path.join(OUT, filename + '.json'), 'w') as f:
            json.dump({'fields': fields, 'values': values, 'content_length': want, 'chunked': chunked,
                       'body_len': len(body), 'file_size': len(data), 'sha256': sha, 'checksum_ok': ok}, f)
        if ok is False:
            os.remove(os.path.join(OUT, filename))
            return self.answer(500, None, 'checksum mismatch')
        return self.answer(200, UPID)


server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
