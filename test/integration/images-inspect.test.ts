/**
 * ImageStore.inspect on real and hostile images, and the parsers of the tools' JSON on
 * captured output (test/fixtures/images/*.json). Fail closed: whatever carries a LUKS or
 * qcow2-encryption header is never reported as raw.
 */
import anyTest, { type TestFn } from 'ava';
import { randomBytes } from 'node:crypto';
import { copyFile, mkdir, readFile, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseImageHeader } from '../../host-agent/src/images/header.js';
import { createHostImageStore } from '../../host-agent/src/images/image-store.js';
import { parseLuks2Metadata, parseQemuImgInfo } from '../../host-agent/src/images/tool-json.js';
import type { ImageSpec } from '../../host-agent/src/images/types.js';
import { isDomainError } from '../../shared/src/errors.js';
import { runTool } from '../../shared/src/run-tool.js';
import { awkwardSecret, domainRejection, removeDir, specFor, tempDir } from '../fixtures/images/image-helpers.js';

interface Ctx {
  dir: string;
  luks: ImageSpec;
  qcow2Luks: ImageSpec;
  luks2: ImageSpec;
}
const test = anyTest as TestFn<Ctx>;
const store = createHostImageStore();
const FIXTURES = fileURLToPath(new URL('../../../test/fixtures/images/', import.meta.url));
const fixture = (name: string) => readFile(join(FIXTURES, name), 'utf8');

test.before(async (t) => {
  const dir = await tempDir();
  t.context.dir = dir;
  t.context.luks = specFor(dir, 'luks');
  t.context.qcow2Luks = specFor(dir, 'qcow2-luks');
  t.context.luks2 = specFor(dir, 'luks2');
  await Promise.all([t.context.luks, t.context.qcow2Luks, t.context.luks2].map((s) => store.create(s, awkwardSecret())));
});

test.after.always(async (t) => {
  await removeDir(t.context.dir);
});

/** A copy of the first `bytes` bytes of an image. */
async function truncatedCopy(t: { context: Ctx }, source: string, name: string, bytes: number): Promise<string> {
  const path = join(t.context.dir, name);
  await copyFile(source, path);
  await truncate(path, bytes);
  return path;
}

test('a missing path is missing; a directory and a dangling symlink are refused', async (t) => {
  t.deepEqual(await store.inspect(join(t.context.dir, 'nothing-here.img')), { exists: false, kind: 'missing' });
  t.is((await domainRejection(store.inspect(t.context.dir))).kind, 'failed_precondition');
  const link = join(t.context.dir, 'dangling.img');
  await symlink(join(t.context.dir, 'nowhere'), link);
  t.is((await domainRejection(store.inspect(link))).kind, 'failed_precondition');
  t.is((await domainRejection(store.inspect('relative.img'))).kind, 'invalid_argument');
});

test('random data and an empty file are raw', async (t) => {
  const path = join(t.context.dir, 'random.img');
  await writeFile(path, randomBytes(1 << 20));
  t.deepEqual(await store.inspect(path), { exists: true, kind: 'raw', virtualSizeBytes: 1n << 20n });
  const empty = join(t.context.dir, 'empty.img');
  await writeFile(empty, '');
  t.deepEqual(await store.inspect(empty), { exists: true, kind: 'raw', virtualSizeBytes: 0n });
});

test('the first 4 KiB of a LUKS1 image are still luks1 (damaged), never raw', async (t) => {
  const whole = await store.inspect(t.context.luks.path);
  const path = await truncatedCopy(t, t.context.luks.path, 'luks1-4k.img', 4096);
  const info = await store.inspect(path);
  t.is(info.kind, 'luks1');
  t.true(info.damaged);
  t.is(info.uuid, whole.uuid, 'the UUID is in the first 4 KiB');
  t.is(info.virtualSizeBytes, undefined);
  // Even the bare magic and version.
  const tiny = await truncatedCopy(t, t.context.luks.path, 'luks1-8.img', 8);
  t.is((await store.inspect(tiny)).kind, 'luks1');
});

test('the first 4 KiB of a LUKS2 image are still luks2 (damaged)', async (t) => {
  const path = await truncatedCopy(t, t.context.luks2.path, 'luks2-4k.img', 4096);
  const info = await store.inspect(path);
  t.is(info.kind, 'luks2');
  t.true(info.damaged);
});

test('a LUKS2 image whose primary header was overwritten is found by its secondary header', async (t) => {
  const path = join(t.context.dir, 'luks2-no-primary.img');
  await copyFile(t.context.luks2.path, path);
  const bytes = await readFile(path);
  bytes.fill(0, 0, 4096);
  await writeFile(path, bytes);
  const info = await store.inspect(path);
  t.is(info.kind, 'luks2');
  t.true(info.damaged);
  t.is(info.uuid, (await store.inspect(t.context.luks2.path)).uuid);
});

test('a truncated qcow2-luks image is still qcow2-luks; a qcow2 without encryption is qcow2', async (t) => {
  const path = await truncatedCopy(t, t.context.qcow2Luks.path, 'qcow2luks-64k.img', 65536);
  const info = await store.inspect(path);
  t.is(info.kind, 'qcow2-luks');
  const headerOnly = await truncatedCopy(t, t.context.qcow2Luks.path, 'qcow2luks-512.img', 512);
  const h = await store.inspect(headerOnly);
  t.is(h.kind, 'qcow2-luks');
  t.true(h.damaged);

  const plainQcow2 = join(t.context.dir, 'plain.qcow2');
  t.is((await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', plainQcow2, '4M'])).code, 0);
  t.deepEqual(await store.inspect(plainQcow2), { exists: true, kind: 'qcow2', virtualSizeBytes: 4n << 20n });
});

test('inspect never opens the backing file a qcow2 header names', async (t) => {
  const overlay = join(t.context.dir, 'overlay.qcow2');
  const base = join(t.context.dir, 'base.qcow2');
  t.is((await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M'])).code, 0);
  t.is((await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay])).code, 0);
  await writeFile(base, 'not a qcow2 any more');
  const info = await store.inspect(overlay);
  t.is(info.kind, 'qcow2');
  t.is(info.damaged, undefined);
});

test('hostile headers: legacy qcow2 AES and an unknown LUKS version are refused, not guessed', async (t) => {
  const aes = join(t.context.dir, 'aes.qcow2');
  t.is((await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', aes, '4M'])).code, 0);
  const bytes = await readFile(aes);
  bytes.writeUInt32BE(1, 32); // crypt_method = AES
  await writeFile(aes, bytes);
  t.is((await domainRejection(store.inspect(aes))).kind, 'failed_precondition');

  const v3 = join(t.context.dir, 'luks-v3.img');
  const head = Buffer.alloc(4096);
  Buffer.from('LUKS\xba\xbe', 'latin1').copy(head);
  head.writeUInt16BE(3, 6);
  await writeFile(v3, head);
  t.is((await domainRejection(store.inspect(v3))).kind, 'failed_precondition');
});

test('parseImageHeader on hand-made headers', (t) => {
  const luks1 = Buffer.alloc(1024);
  Buffer.from('LUKS\xba\xbe', 'latin1').copy(luks1);
  luks1.writeUInt16BE(1, 6);
  luks1.writeUInt32BE(4096, 104);
  Buffer.from('0b6f1c6e-6d7b-4f0e-9a59-4a1b2c3d4e5f\0', 'latin1').copy(luks1, 168);
  t.deepEqual(parseImageHeader(luks1), { type: 'luks', version: 1, uuid: '0b6f1c6e-6d7b-4f0e-9a59-4a1b2c3d4e5f', payloadOffsetBytes: 4096n * 512n });
  // A UUID field holding garbage is left out rather than passed on.
  Buffer.from('"><script>', 'latin1').copy(luks1, 168);
  t.is((parseImageHeader(luks1) as { uuid?: string }).uuid, undefined);
  const q = Buffer.alloc(64);
  Buffer.from('QFI\xfb', 'latin1').copy(q);
  q.writeUInt32BE(3, 4);
  q.writeBigUInt64BE(1n << 40n, 24);
  q.writeUInt32BE(2, 32);
  t.deepEqual(parseImageHeader(q), { type: 'qcow2', version: 3, virtualSizeBytes: 1n << 40n, cryptMethod: 2 });
  t.deepEqual(parseImageHeader(q.subarray(0, 6)), { type: 'qcow2' }, 'short qcow2 header: what is there, nothing guessed');
  t.deepEqual(parseImageHeader(Buffer.alloc(4096)), { type: 'none' });
});

test('parseQemuImgInfo on captured qemu-img 7.2 output', async (t) => {
  const luks = parseQemuImgInfo(await fixture('qemu-img-info-luks.json'));
  t.is(luks.format, 'luks');
  t.is(luks.encryptFormat, 'luks');
  t.is(luks.virtualSizeBytes, 10485760n);
  t.regex(luks.uuid ?? '', /^[0-9a-f-]{36}$/);
  const ql = parseQemuImgInfo(await fixture('qemu-img-info-qcow2-luks.json'));
  t.is(ql.format, 'qcow2');
  t.is(ql.encryptFormat, 'luks');
  const q = parseQemuImgInfo(await fixture('qemu-img-info-qcow2.json'));
  t.is(q.encryptFormat, undefined);
  t.is(q.virtualSizeBytes, 10485760n);
});

test('parseLuks2Metadata on captured cryptsetup 2.6 output', async (t) => {
  const m = parseLuks2Metadata(await fixture('luks2-dump.json'));
  t.deepEqual(m.segments, [{ offsetBytes: 16777216n, sizeBytes: 'dynamic', sectorSize: 4096, encryption: 'aes-xts-plain64' }]);
  t.is(m.keyslots, 1);
});

test('hostile or cut tool output is an internal error, never a guess', (t) => {
  const kinds = (f: () => unknown) => {
    try {
      f();
    } catch (err) {
      return isDomainError(err) ? err.kind : 'not a DomainError';
    }
    return 'no error';
  };
  t.is(kinds(() => parseQemuImgInfo('{"virtual-size": 1, "format": "qcow2"')), 'internal');
  t.is(kinds(() => parseQemuImgInfo('[]')), 'internal');
  t.is(kinds(() => parseQemuImgInfo('{"virtual-size": -1, "format": "qcow2"}')), 'internal');
  t.is(kinds(() => parseQemuImgInfo('{"virtual-size": 1e300, "format": "qcow2"}')), 'internal');
  t.is(kinds(() => parseQemuImgInfo('{"virtual-size": 1, "format": "qcow2", "encrypted": true}')), 'internal');
  t.is(kinds(() => parseQemuImgInfo('{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2", "data": {"encrypt": "luks"}}}')), 'internal');
  t.is(kinds(() => parseLuks2Metadata('{"segments": {"0": {"type": "crypt", "offset": "x"}}, "keyslots": {}}')), 'internal');
  t.is(kinds(() => parseLuks2Metadata('{}')), 'internal');
});

test('inspect of an image inside a directory with odd characters in its name', async (t) => {
  const odd = join(t.context.dir, 'odd ,dir:"x"');
  await mkdir(odd);
  const spec = { ...specFor(odd, 'plain'), path: join(odd, 'vol,a=b:c.img') };
  await store.create(spec, randomBytes(64));
  t.is((await store.inspect(spec.path)).kind, 'raw');
  const q = join(odd, 'q,file=x.qcow2');
  t.is((await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', q, '4M'])).code, 0);
  t.is((await store.inspect(q)).kind, 'qcow2');
});
