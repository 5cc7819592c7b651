// Unit tests of the JSON-lines logger: format, level filtering and redaction of byte arrays.
import anyTest from 'ava';
import type { TestFn } from 'ava';

import { createLogger, describeError, silentLogger } from '../../shared/src/log.js';
import type { LogFields, LogLevel, Logger, LoggerOptions } from '../../shared/src/log.js';

interface Context {
  lines: string[];
  make: (options?: Partial<LoggerOptions>) => Logger;
}

const test = anyTest as TestFn<Context>;

const FIXED_TIME = new Date('2024-05-06T07:08:09.010Z');

test.beforeEach((t) => {
  const lines: string[] = [];
  t.context = {
    lines,
    make: (options = {}) =>
      createLogger({ component: 'test', write: (line) => lines.push(line), now: () => FIXED_TIME, ...options }),
  };
});

/** Parses the only line written so far. */
function onlyRecord(lines: string[]): Record<string, unknown> {
  if (lines.length !== 1) throw new Error(`expected one log line, got ${lines.length}`);
  return JSON.parse(lines[0] ?? '') as Record<string, unknown>;
}

test('writes one JSON object per line with time, level, component and msg', (t) => {
  const log = t.context.make();
  log.info('volume created', { volume: 'vol-1', size: 10, attached: false, owner: null });
  t.is(t.context.lines.length, 1);
  const line = t.context.lines[0] ?? '';
  t.false(line.includes('\n'), 'a record is a single line');
  t.deepEqual(JSON.parse(line), {
    time: FIXED_TIME.toISOString(),
    level: 'info',
    component: 'test',
    msg: 'volume created',
    volume: 'vol-1',
    size: 10,
    attached: false,
    owner: null,
  });
});

test('a message with newlines still produces a single line', (t) => {
  const log = t.context.make();
  log.warn('first\nsecond\r\nthird', { detail: 'a\nb' });
  t.is(t.context.lines.length, 1);
  t.false((t.context.lines[0] ?? '').includes('\n'));
  const record = onlyRecord(t.context.lines);
  t.is(record['msg'], 'first\nsecond\r\nthird');
  t.is(record['detail'], 'a\nb');
});

test('undefined fields are omitted', (t) => {
  const log = t.context.make();
  log.info('x', { present: 'yes', absent: undefined });
  const record = onlyRecord(t.context.lines);
  t.is(record['present'], 'yes');
  t.false('absent' in record);
});

test('default level is info: debug is dropped', (t) => {
  const log = t.context.make();
  log.debug('hidden');
  log.info('shown');
  t.is(t.context.lines.length, 1);
  t.is(onlyRecord(t.context.lines)['msg'], 'shown');
});

const LEVELS: LogLevel[] = ['debug', 'info', 'warn', 'error'];

for (const [minIndex, min] of LEVELS.entries()) {
  test(`level ${min} keeps only ${min} and above`, (t) => {
    const log = t.context.make({ level: min });
    for (const level of LEVELS) log[level](`at ${level}`);
    const written = t.context.lines.map((l) => (JSON.parse(l) as { level: string }).level);
    t.deepEqual(written, LEVELS.slice(minIndex));
  });
}

test('child loggers extend the component and keep the level', (t) => {
  const log = t.context.make({ level: 'warn' }).child('rpc').child('keys');
  log.info('dropped');
  log.error('kept');
  const record = onlyRecord(t.context.lines);
  t.is(record['component'], 'test.rpc.keys');
  t.is(record['level'], 'error');
});

test('bigint fields are written as strings', (t) => {
  const log = t.context.make();
  const big = 12345678901234567890123n;
  log.info('counter', { n: big, small: 5n });
  const record = onlyRecord(t.context.lines);
  t.is(record['n'], '12345678901234567890123');
  t.is(record['small'], '5');
});

/** Distinctive bytes, so that any encoding of them would be found in the line. */
function secretBytes(): Buffer {
  const buf = Buffer.alloc(32);
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 37 + 11) & 0xff;
  return buf;
}

/** All the ways the bytes could plausibly leak into a line. */
function encodings(buf: Buffer): string[] {
  const out = [
    buf.toString('hex'),
    buf.toString('hex').toUpperCase(),
    buf.toString('base64'),
    buf.toString('base64url'),
    buf.toString('latin1'),
    JSON.stringify(buf.toString('latin1')).slice(1, -1),
    JSON.stringify(Array.from(buf)).slice(1, -1),
    Array.from(buf).join(','),
  ];
  // Also a prefix of each, in case of truncation.
  return [...out, ...out.map((s) => s.slice(0, 12))];
}

test('a Buffer field is redacted and its bytes never appear', (t) => {
  const secret = secretBytes();
  const log = t.context.make();
  // The type forbids byte arrays; simulate one slipping through at run time.
  log.info('released key', { volume: 'vol-1', key: secret as unknown as string });
  const line = t.context.lines[0] ?? '';
  t.is(onlyRecord(t.context.lines)['key'], '[redacted]');
  t.is(onlyRecord(t.context.lines)['volume'], 'vol-1');
  for (const enc of encodings(secret)) t.false(line.includes(enc), `line contains an encoding of the secret: ${enc}`);
});

test('a Uint8Array field is redacted and its bytes never appear', (t) => {
  const secret = secretBytes();
  const view = new Uint8Array(secret.buffer.slice(secret.byteOffset, secret.byteOffset + secret.length));
  const log = t.context.make();
  log.error('seal failed', { dek: view as unknown as string });
  const line = t.context.lines[0] ?? '';
  t.is(onlyRecord(t.context.lines)['dek'], '[redacted]');
  for (const enc of encodings(secret)) t.false(line.includes(enc), `line contains an encoding of the secret: ${enc}`);
});

test('objects and arrays slipping through are redacted too', (t) => {
  const log = t.context.make();
  const fields = { obj: { secret: 'hunter2' }, arr: ['hunter2'], fn: () => 'hunter2' } as unknown as LogFields;
  log.info('x', fields);
  const record = onlyRecord(t.context.lines);
  t.is(record['obj'], '[redacted]');
  t.is(record['arr'], '[redacted]');
  t.is(record['fn'], '[redacted]');
  t.false((t.context.lines[0] ?? '').includes('hunter2'));
});

test('describeError gives name, message and cause but not the object', (t) => {
  const err = new Error('outer', { cause: new TypeError('inner') });
  const fields = describeError(err);
  t.is(fields['error'], 'Error: outer');
  t.is(fields['cause'], 'TypeError: inner');
  t.is(typeof fields['stack'], 'string');
  t.false(String(fields['stack']).includes('\n'));
  t.deepEqual(describeError('plain'), { error: 'plain' });
});

test('silentLogger writes nothing', (t) => {
  const writes: unknown[] = [];
  const original = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: unknown) => {
    writes.push(chunk);
    return true;
  }) as typeof process.stderr.write;
  try {
    silentLogger.debug('a');
    silentLogger.info('b');
    silentLogger.warn('c');
    silentLogger.error('d');
  } finally {
    process.stderr.write = original;
  }
  t.deepEqual(writes, []);
});
