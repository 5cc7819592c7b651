/**
 * Unit tests of shared/src/kek: the PKCS#11 URI parser, PCR selections and TCTIs, TPM
 * error mapping (with a fake tool runner), the record parsers of the PKCS#11 and TPM
 * sealers, and runTool's binary stdout. The real SoftHSM2 and swtpm are exercised in
 * test/integration/sealer-pkcs11.test.ts and sealer-tpm2.test.ts.
 */
import test from 'ava';
import { DomainError } from '../../shared/src/errors.js';
import { formatPkcs11Uri, parsePkcs11Uri } from '../../shared/src/kek/pkcs11-uri.js';
import { parsePkcs11WrappedSecret, pkcs11KeyUri } from '../../shared/src/kek/pkcs11.js';
import { checkTcti, parsePcrSelection, tpmResponseCode, tpmUnseal, type TpmSealedSecret } from '../../shared/src/kek/tpm2.js';
import { parseSealedKeyRecord } from '../../shared/src/kek/sealed-secret.js';
import { runTool, type RunTool } from '../../shared/src/run-tool.js';
import { parseSealedMasterKey } from '../../server/src/master-key/sealers.js';

function kindOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return err instanceof DomainError ? `${err.kind}: ${err.message}` : `not a DomainError: ${String(err)}`;
  }
  return 'no error';
}

const MODULE = '/usr/lib/softhsm/libsofthsm2.so';

test('a PKCS#11 URI is parsed, percent-decoded and formatted canonically', (t) => {
  const u = parsePkcs11Uri(`pkcs11:token=My%20Token;object=virtkm-kek;id=%01%ff;type=secret-key;serial=abc123?module-path=${MODULE}&pin-source=file:/etc/virtkm/pin`);
  t.is(u.token, 'My Token');
  t.is(u.object, 'virtkm-kek');
  t.deepEqual([...(u.id ?? [])], [1, 255]);
  t.is(u.type, 'secret-key');
  t.is(u.serial, 'abc123');
  t.is(u.modulePath, MODULE);
  t.is(u.pinSource, '/etc/virtkm/pin');
  const text = formatPkcs11Uri(u);
  t.is(text, `pkcs11:serial=abc123;token=My%20Token;id=%01%FF;object=virtkm-kek;type=secret-key?module-path=${MODULE}&pin-source=file:/etc/virtkm/pin`);
  t.deepEqual(parsePkcs11Uri(text), u);
  // file:///path and a bare absolute path name the same PIN file.
  t.is(parsePkcs11Uri('pkcs11:token=a?pin-source=file:///p/pin').pinSource, '/p/pin');
  t.is(parsePkcs11Uri('pkcs11:token=a?pin-source=/p/pin').pinSource, '/p/pin');
  t.is(parsePkcs11Uri('PKCS11:slot-id=3;library-version=2.6').slotId, 3);
  t.deepEqual(parsePkcs11Uri('pkcs11:'), {});
});

test('the PKCS#11 URI parser refuses what it does not understand', (t) => {
  const cases: [string, RegExp][] = [
    ['http://x', /must start with "pkcs11:"/],
    ['pkcs11:token=a;token=b', /appears more than once/],
    ['pkcs11:tokn=a', /unknown path attribute tokn/],
    ['pkcs11:x-vendor=1', /vendor attribute x-vendor/],
    ['pkcs11:token=a?pin-value=1234', /pin-value is not accepted/],
    ['pkcs11:token=a?module-path=relative.so', /module-path must be an absolute path/],
    ['pkcs11:token=a?pin-source=|/bin/cat', /characters that must be percent-encoded|pin-source must be a file/],
    ['pkcs11:token=a?pin-source=file:relative', /pin-source must be a file/],
    ['pkcs11:token=a b', /must be percent-encoded/],
    ['pkcs11:token=%zz', /must be percent-encoded/],
    ['pkcs11:token=%ff', /not valid UTF-8/],
    ['pkcs11:type=secret', /type must be one of/],
    ['pkcs11:slot-id=-1', /slot-id must be a decimal number/],
    ['pkcs11:token', /is not NAME=VALUE/],
    ['pkcs11:token=', /token is empty/],
    ['pkcs11:token=a?', /empty query/],
    ['pkcs11:token=a?foo=1', /unknown query attribute foo/],
    [`pkcs11:token=${'a'.repeat(5000)}`, /at most 4096/],
  ];
  for (const [uri, re] of cases) {
    const got = kindOf(() => parsePkcs11Uri(uri));
    t.regex(got, /^invalid_argument: PKCS#11 URI: /, uri);
    t.regex(got, re, uri);
  }
});

test('a key URI needs a secret key named by object or id, a module path and a PIN file', (t) => {
  const k = pkcs11KeyUri(`pkcs11:token=t;object=k?module-path=${MODULE}`, '/run/pin');
  t.is(k.text, `pkcs11:token=t;object=k;type=secret-key?module-path=${MODULE}&pin-source=file:/run/pin`);
  t.regex(kindOf(() => pkcs11KeyUri(`pkcs11:token=t?module-path=${MODULE}&pin-source=/p`)), /name the key with object=/);
  t.regex(kindOf(() => pkcs11KeyUri('pkcs11:token=t;object=k?pin-source=/p')), /module-path is required/);
  t.regex(kindOf(() => pkcs11KeyUri(`pkcs11:token=t;object=k?module-path=${MODULE}`)), /a PIN file is required/);
  t.regex(kindOf(() => pkcs11KeyUri(`pkcs11:token=t;object=k;type=private?module-path=${MODULE}&pin-source=/p`)), /type=secret-key/);
  t.regex(kindOf(() => pkcs11KeyUri(`pkcs11:token=t;object=k?module-path=${MODULE}`, 'relative/pin')), /absolute path/);
});

test('PCR selections and TCTIs are checked and normalised', (t) => {
  t.is(parsePcrSelection('sha256:7,0'), 'sha256:0,7');
  t.is(parsePcrSelection('sha1:0+sha256:23,7'), 'sha1:0+sha256:7,23');
  for (const bad of ['', 'sha256', 'sha256:', 'sha256:24', 'sha256:0,0', 'md5:0', 'sha256:0+sha256:1', 'sha256:01', 'sha256:0;7']) {
    t.regex(kindOf(() => parsePcrSelection(bad)), /^invalid_argument: PCR selection/, bad);
  }
  t.is(checkTcti('device:/dev/tpmrm0'), 'device:/dev/tpmrm0');
  t.is(checkTcti('swtpm:host=127.0.0.1,port=2321'), 'swtpm:host=127.0.0.1,port=2321');
  t.is(checkTcti('tabrmd'), 'tabrmd');
  for (const bad of ['', 'device:/dev/tpm0;rm -rf /', 'libtpms', 'swtpm:host=a b']) t.regex(kindOf(() => checkTcti(bad)), /^invalid_argument: TPM TCTI/, bad);
});

test('TPM response codes are read from tpm2-tools stderr', (t) => {
  t.is(tpmResponseCode('ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed'), 0x99d);
  t.is(tpmResponseCode('ERROR: Eys_Load(0x1DF) - tpm:parameter(1):integrity check failed'), 0x1df);
  t.is(tpmResponseCode('WARNING:tcti: Failed to connect'), undefined);
});

const SEALED: TpmSealedSecret = { tcti: 'swtpm:host=127.0.0.1,port=1', pcrs: 'sha256:0,7', primary: 'ecc256:aes128cfb', public: 'AAAA', private: 'BBBB' };

/** A tool runner whose tpm2_unseal fails with `stderr` (everything else succeeds). */
function fakeTpm(stderr: string): { run: RunTool; calls: string[] } {
  const calls: string[] = [];
  const run: RunTool = async (file, args) => {
    calls.push([file, ...args].join(' '));
    if (file === 'tpm2_unseal') return { code: 1, stdout: '', stderr, truncated: false, stdoutBytes: Buffer.alloc(0) };
    return { code: 0, stdout: '', stderr: '', truncated: false };
  };
  return { run, calls };
}

test('TPM failures map to clear errors: other TPM, changed PCRs, unreachable TPM', async (t) => {
  const cases: [string, string, RegExp][] = [
    ['ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed', 'failed_precondition', /PCR values differ/],
    ['ERROR: Esys_Unseal(0x1DF) - tpm:parameter(1):integrity check failed', 'unauthenticated', /this TPM did not seal the key/],
    ['ERROR:tcti: Cannot connect', 'unavailable', /the TPM cannot be reached/],
    ['ERROR: Esys_Unseal(0xA0008) - tcti:IO failure', 'unavailable', /the TPM cannot be reached/],
    ['ERROR: Esys_Unseal(0x921) - lockout', 'permission_denied', /lockout/],
  ];
  for (const [stderr, kind, re] of cases) {
    const { run, calls } = fakeTpm(stderr);
    const err = await t.throwsAsync(tpmUnseal(SEALED, { run }));
    t.true(err instanceof DomainError);
    t.is((err as DomainError).kind as string, kind, stderr);
    t.regex(err!.message, re);
    // The PCR policy is used, the TCTI given to every tool, and contexts flushed (no RM).
    t.true(calls.some((c) => c.startsWith('tpm2_unseal') && c.includes('-p pcr:sha256:0,7')));
    t.true(calls.every((c) => c.includes('-T swtpm:host=127.0.0.1,port=1')));
    t.true(calls.some((c) => c.startsWith('tpm2_flushcontext -t')));
  }
  // Through the kernel's resource manager nothing is flushed.
  const { run, calls } = fakeTpm('ERROR: Esys_Unseal(0x99D) - policy');
  await t.throwsAsync(tpmUnseal({ ...SEALED, tcti: 'device:/dev/tpmrm0' }, { run }));
  t.false(calls.some((c) => c.startsWith('tpm2_flushcontext')));
});

const KEY_ID = '0011223344556677';
const ENVELOPE = Buffer.alloc(60, 1).toString('base64');

test('master key records of the pkcs11 and tpm2 sealers are parsed strictly', (t) => {
  const uri = `pkcs11:token=t;object=k?module-path=${MODULE}&pin-source=file:/p`;
  const wrapped = { mechanism: 'aes-256-gcm', iv: Buffer.alloc(12).toString('base64'), ciphertext: Buffer.alloc(48).toString('base64'), tokenSerial: 'abc', tokenLabel: 't' };
  const base = { format: 'virtkm-master-key', version: 1, keyId: KEY_ID, envelope: ENVELOPE };
  const p = parseSealedMasterKey({ ...base, sealer: 'pkcs11', params: { uri, ...wrapped, extra: 1 } });
  t.is(p.sealer, 'pkcs11');
  if (p.sealer === 'pkcs11') {
    t.is(p.params.uri, `pkcs11:token=t;object=k;type=secret-key?module-path=${MODULE}&pin-source=file:/p`, 'stored canonical');
    t.false('extra' in p.params, 'unknown fields dropped');
  }
  t.regex(kindOf(() => parseSealedMasterKey({ ...base, sealer: 'pkcs11', params: { uri: 'pkcs11:token=t?pin-value=1', ...wrapped } })), /failed_precondition: .*params\.uri/);
  t.regex(kindOf(() => parseSealedMasterKey({ ...base, sealer: 'pkcs11', params: { uri, ...wrapped, iv: 'AAAA' } })), /params\.iv/);
  t.regex(kindOf(() => parseSealedMasterKey({ ...base, sealer: 'pkcs11', params: { uri, ...wrapped, mechanism: 'aes-ecb' } })), /params\.mechanism/);
  const tpm = parseSealedMasterKey({ ...base, sealer: 'tpm2', params: SEALED });
  t.deepEqual(tpm.params, SEALED);
  t.regex(kindOf(() => parseSealedMasterKey({ ...base, sealer: 'tpm2', params: { ...SEALED, pcrs: 'sha256:7,0' } })), /params\.pcrs/, 'PCRs must be stored normalised');
  t.regex(kindOf(() => parseSealedMasterKey({ ...base, sealer: 'tpm2', params: { ...SEALED, tcti: 'x' } })), /params\.tcti/);
  t.regex(kindOf(() => parseSealedMasterKey({ ...base, sealer: 'tpm2', params: { ...SEALED, private: '' } })), /params\.private/);
  t.regex(kindOf(() => parsePkcs11WrappedSecret({ ...wrapped, ciphertext: Buffer.alloc(16).toString('base64') }, (w) => new DomainError('failed_precondition', w))), /ciphertext/);
});

test('sealed host key records are parsed strictly', (t) => {
  const ok = { format: 'virtkm-sealed-key', version: 1, purpose: 'agent-host-key', keyId: KEY_ID, sealer: 'tpm2', params: SEALED };
  t.is(parseSealedKeyRecord(ok).sealer, 'tpm2');
  t.regex(kindOf(() => parseSealedKeyRecord({ ...ok, sealer: 'file' })), /malformed: sealer/);
  t.regex(kindOf(() => parseSealedKeyRecord({ ...ok, keyId: 'xyz' })), /malformed: keyId/);
  t.regex(kindOf(() => parseSealedKeyRecord({ ...ok, purpose: 'Bad Purpose' })), /malformed: purpose/);
  t.regex(kindOf(() => parseSealedKeyRecord({ ...ok, version: 2 })), /unsupported version/);
});

test('runTool can capture stdout as bytes, binary-safe, without a string copy', async (t) => {
  const r = await runTool('printf', ['\\377\\000\\n\\200'], { binaryStdout: true });
  t.is(r.code, 0);
  t.is(r.stdout, '');
  t.deepEqual([...(r.stdoutBytes ?? [])], [0xff, 0x00, 0x0a, 0x80]);
  const big = await runTool('head', ['-c', '200000', '/dev/zero'], { binaryStdout: true });
  t.is(big.stdoutBytes?.length, 200000);
  const text = await runTool('printf', ['abc']);
  t.is(text.stdout, 'abc');
  t.is(text.stdoutBytes, undefined);
});
