/**
 * `virtkm`, the command-line client for admins and frontends. `main(argv, io)` is the
 * whole program, so tests run it in-process and assert on stdout, stderr and exit code.
 *
 * Exit codes: 0 ok; 1 error; 2 usage or invalid input; 3 not found; 4 permission denied
 * or not authenticated; 5 server unavailable; 6 audit log verification failed.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { Command, CommanderError, Option } from 'commander';
import { Metadata, type CallOptions, type ClientUnaryCall, type ServiceError } from '@grpc/grpc-js';
import { Role, type AuditEvent, type ListGuestsResponse, type ListVolumesResponse } from '../../../shared/src/api.js';
import { DomainError, isDomainError, type ErrorKind } from '../../../shared/src/errors.js';
import { callOptions, unaryCall } from '../../../shared/src/grpc-client.js';
import { formatCredentialBundle, generateTlsKeyPair, parseCredentialBundle } from '../../../shared/src/pki.js';
import { connectClients, type ApiClients } from './clients.js';
import type { SubmitShareResponse, UnsealStatusResponse } from '../../../shared/src/api.js';
import { promptPassphrase } from '../../../shared/src/passphrase.js';
import { ownedCopy, wipe } from '../../../shared/src/secret-bytes.js';
import { openSecretFile, readBounded } from '../master-key/secret-files.js';
import { MAX_SHARE_TEXT } from '../master-key/shamir-sealer.js';
import { resolveConnection } from './config.js';
import { FORMAT_NAMES, formatSize, guestView, hostView, parseSize, table, toJson, volumeView } from './format.js';
import { addRotationCommands, formatVolumeShow, volumeShowView } from './rotation-commands.js';
import type { CliTerminal } from './terminal.js';

/** What the CLI reads and writes; the real process or a test double. */
export interface CliIo {
  stdout: (s: string) => void;
  stderr: (s: string) => void;
  env: Record<string, string | undefined>;
  /** The terminal (questions, live progress); absent: behave as on a pipe. */
  terminal?: CliTerminal;
}

const EXIT_OF_KIND: Readonly<Record<ErrorKind, number>> = {
  not_found: 3,
  already_exists: 1,
  invalid_argument: 2,
  failed_precondition: 1,
  permission_denied: 4,
  unauthenticated: 4,
  resource_exhausted: 2,
  unavailable: 5,
  internal: 1,
};

/** Exit code when `audit verify` finds the log tampered with. */
export const EXIT_AUDIT_BROKEN = 6;

/** The 4-argument form of a generated unary client method. */
type UnaryMethod<Req, Res> = (req: Req, md: Metadata, opts: Partial<CallOptions>, cb: (err: ServiceError | null, res: Res) => void) => ClientUnaryCall;

class ExitWith extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** Runs the CLI; resolves to the exit code. */
export async function main(argv: string[], io: CliIo): Promise<number> {
  let clients: ApiClients | undefined;
  const program = new Command('virtkm');
  program
    .description('virtkm: keys for encrypted virtual-machine disks')
    .option('--server <addr>', 'server address HOST:PORT (or VIRTKM_SERVER)')
    .option('--credentials <file>', 'credential bundle PEM (or VIRTKM_CREDENTIALS)')
    .option('--config <file>', 'config file (or VIRTKM_CONFIG)')
    .option('--timeout <seconds>', 'per-call timeout', '30')
    .exitOverride()
    .configureOutput({ writeOut: io.stdout, writeErr: io.stderr, outputError: (s, write) => write(s.replace(/^error: /, 'virtkm: ')) })
    .showHelpAfterError(false);

  const connect = (): ApiClients => {
    if (clients) return clients;
    const g = program.opts<{ server?: string; credentials?: string; config?: string }>();
    const conn = resolveConnection(g, io.env);
    let pem: string;
    try {
      pem = readFileSync(conn.credentialsPath, 'utf8');
    } catch {
      throw new DomainError('invalid_argument', `cannot read credentials file ${conn.credentialsPath}`);
    }
    const bundle = parseCredentialBundle(pem);
    clients = connectClients(conn.server, bundle);
    return clients;
  };
  const timeoutMs = () => Number(program.opts<{ timeout: string }>().timeout) * 1000 || 30_000;
  /** Calls one unary method: `rpc((c) => c.volumes.getVolume.bind(c.volumes), req)`. */
  const rpc = <Req, Res>(pick: (c: ApiClients) => UnaryMethod<Req, Res>, req: Req): Promise<Res> => {
    const method = pick(connect());
    return unaryCall<Res>((cb) => method(req, new Metadata(), callOptions(timeoutMs()), cb));
  };
  const out = (json: boolean, data: unknown, human: () => string) => io.stdout(json ? toJson(data) + '\n' : human());

  // ---- volume ----
  const volume = program.command('volume').description('encrypted volumes and their keys');
  volume
    .command('create <name>')
    .description('create a volume with its own random secret')
    .requiredOption('--size <size>', 'size, e.g. 10G')
    .addOption(new Option('--format <format>', 'encryption format (raw and qcow2: unencrypted, no key)').choices(Object.keys(FORMAT_NAMES)).makeOptionMandatory())
    .option('--cipher <cipher>', 'cipher (default aes-xts-plain64)')
    .option('--key-size <bits>', 'key size in bits: 256 or 512 (default 512)')
    .option('--sector-size <bytes>', 'sector size: 512 or 4096 (luks2, plain)')
    .option('--json', 'machine-readable output')
    .action(async (name: string, o: { size: string; format: string; cipher?: string; keySize?: string; sectorSize?: string; json?: boolean }) => {
      const req = {
        name,
        sizeBytes: parseSize(o.size),
        format: FORMAT_NAMES[o.format] ?? 0,
        cipher: { cipher: o.cipher ?? '', keySizeBits: intOption('--key-size', o.keySize), sectorSize: intOption('--sector-size', o.sectorSize) },
      };
      const res = await rpc((c) => c.volumes.createVolume.bind(c.volumes), req);
      const v = volumeView(res.volume!);
      out(!!o.json, v, () => `created volume ${v.name} (${v.id}), ${formatSize(BigInt(v.size_bytes))} ${v.format}, key version ${v.active_key_version}\n`);
    });
  volume
    .command('list')
    .description('list volumes')
    .option('--prefix <prefix>', 'only names starting with this')
    .addOption(new Option('--format <format>', 'only this format').choices(Object.keys(FORMAT_NAMES)))
    .option('--limit <n>', 'at most n volumes (default: all)')
    .option('--json', 'machine-readable output')
    .action(async (o: { prefix?: string; format?: string; limit?: string; json?: boolean }) => {
      const limit = intOption('--limit', o.limit) || Infinity;
      const all: ReturnType<typeof volumeView>[] = [];
      let token = '';
      do {
        const res: ListVolumesResponse = await rpc((c) => c.volumes.listVolumes.bind(c.volumes), { page: { pageSize: Math.min(1000, limit - all.length), pageToken: token }, namePrefix: o.prefix ?? '', format: o.format ? FORMAT_NAMES[o.format] ?? 0 : 0 });
        all.push(...res.volumes.map(volumeView));
        token = res.nextPageToken;
      } while (token && all.length < limit);
      out(!!o.json, all, () =>
        table(['NAME', 'ID', 'SIZE', 'FORMAT', 'CIPHER', 'KEY', 'GUESTS'], all.map((v) => [v.name, v.id, formatSize(BigInt(v.size_bytes)), v.format, `${v.cipher}/${v.key_size_bits}`, `v${v.active_key_version}`, v.guests.join(',')])),
      );
    });
  volume
    .command('show <volume>')
    .description('show a volume (by name or id) and its key versions')
    .option('--json', 'machine-readable output')
    .action(async (ref: string, o: { json?: boolean }) => {
      const res = await rpc((c) => c.volumes.getVolume.bind(c.volumes), { volume: ref });
      // Key versions with their lifetimes and the newest rotation: rotation-commands.ts.
      const v = volumeShowView(res);
      out(!!o.json, v, () => formatVolumeShow(v));
    });
  volume
    .command('delete <volume>')
    .description('delete a volume: its secret is destroyed (crypto-shredding)')
    .action(async (ref: string) => {
      await rpc((c) => c.volumes.deleteVolume.bind(c.volumes), { volume: ref });
      io.stdout(`deleted volume ${ref}; its secret is destroyed\n`);
    });

  // ---- guest ----
  const guest = program.command('guest').description('guests (libvirt domains) and their placement');
  guest
    .command('define <name>')
    .description('define (or redefine) a guest from libvirt domain XML')
    .requiredOption('--xml <file>', 'domain XML file')
    .option('--host <host>', 'host the guest is placed on')
    .option('--volume <volume...>', 'volumes (names or ids) the XML uses')
    .option('--autostart', 'start the guest when its host boots', false)
    .option('--json', 'machine-readable output')
    .action(async (name: string, o: { xml: string; host?: string; volume?: string[]; autostart: boolean; json?: boolean }) => {
      let xml: string;
      try {
        xml = readFileSync(o.xml, 'utf8');
      } catch {
        throw new DomainError('invalid_argument', `cannot read ${o.xml}`);
      }
      const res = await rpc((c) => c.guests.defineGuest.bind(c.guests), { name, domainXml: xml, volumes: o.volume ?? [], host: o.host ?? '', autostart: o.autostart });
      const g = guestView(res.guest!, false);
      out(!!o.json, g, () => `defined guest ${g.name} (${g.id}) on ${g.host || '(unplaced)'}, generation ${g.generation}\n`);
    });
  guest
    .command('list')
    .description('list guests')
    .option('--host <host>', 'only guests placed on this host')
    .option('--prefix <prefix>', 'only names starting with this')
    .option('--json', 'machine-readable output')
    .action(async (o: { host?: string; prefix?: string; json?: boolean }) => {
      const all: ReturnType<typeof guestView>[] = [];
      let token = '';
      do {
        const res = await rpc((c) => c.guests.listGuests.bind(c.guests), { page: { pageSize: 100, pageToken: token }, namePrefix: o.prefix ?? '', host: o.host ?? '' });
        all.push(...res.guests.map((g) => guestView(g, false)));
        token = res.nextPageToken;
      } while (token);
      out(!!o.json, all, () => table(['NAME', 'ID', 'HOST', 'STATE', 'AUTOSTART', 'VOLUMES', 'GEN'], all.map((g) => [g.name, g.id, g.host || '-', g.phase || '-', g.autostart ? 'yes' : 'no', String(g.volume_ids.length), g.generation])));
    });
  guest
    .command('show <guest>')
    .description('show a guest with its domain XML')
    .option('--json', 'machine-readable output')
    .action(async (ref: string, o: { json?: boolean }) => {
      const res = await rpc((c) => c.guests.getGuest.bind(c.guests), { guest: ref });
      const g = guestView(res.guest!, true);
      out(!!o.json, g, () =>
        [
          `name:       ${g.name}`,
          `id:         ${g.id}`,
          `host:       ${g.host || '-'}${g.handoff_from ? ` (moving from ${g.handoff_from})` : ''}`,
          `state:      ${g.phase || 'not reported yet'}${g.phase_reason ? ` (${g.phase_reason})` : ''}${g.reported_at ? ` at ${g.reported_at}` : ''}`,
          `autostart:  ${g.autostart ? 'yes' : 'no'}`,
          `volumes:    ${g.volume_ids.join(', ')}`,
          ...g.volume_reports.map((r) => `  ${r.volume_id} on ${r.host}: ${r.phase} (key v${r.key_version})${r.reason ? ` ${r.reason}` : ''}`),
          `generation: ${g.generation}`,
          `updated:    ${g.updated_at}`,
          '',
          g.domain_xml ?? '',
        ].join('\n') + '\n',
      );
    });
  guest
    .command('move <guest>')
    .description('place a guest on another host')
    .requiredOption('--to <host>', 'destination host')
    .option('--force', 'do not wait for the source host to confirm (only if it is gone for good)', false)
    .option('--json', 'machine-readable output')
    .action(async (ref: string, o: { to: string; force: boolean; json?: boolean }) => {
      const res = await rpc((c) => c.guests.moveGuest.bind(c.guests), { guest: ref, toHost: o.to, force: o.force });
      const g = guestView(res.guest!, false);
      out(!!o.json, g, () => `guest ${g.name} is now placed on ${g.host}${g.handoff_from ? `; ${g.handoff_from} hands it over once it has stopped it` : ''}\n`);
    });
  guest
    .command('delete <guest>')
    .description('delete a guest')
    .option('--delete-volumes', 'also delete (crypto-shred) volumes no other guest uses', false)
    .action(async (ref: string, o: { deleteVolumes: boolean }) => {
      await rpc((c) => c.guests.deleteGuest.bind(c.guests), { guest: ref, deleteVolumes: o.deleteVolumes });
      io.stdout(`deleted guest ${ref}${o.deleteVolumes ? ' and its volumes' : ''}\n`);
    });

  // ---- host ----
  const host = program.command('host').description('libvirt hosts');
  const token = host.command('token').description('enrollment tokens');
  token
    .command('create <host>')
    .description('create a one-time enrollment token for a host')
    .option('--ttl <seconds>', 'lifetime in seconds (default 3600)')
    .option('--json', 'machine-readable output')
    .action(async (name: string, o: { ttl?: string; json?: boolean }) => {
      const res = await rpc((c) => c.hosts.createEnrollmentToken.bind(c.hosts), { host: name, ttlSeconds: intOption('--ttl', o.ttl) });
      out(!!o.json, { host: name, token: res.token, expires_at: res.expiresAt, enroll_address: res.enrollAddress }, () =>
        `token for host ${name} (one use, expires ${res.expiresAt}):\n${res.token}\n${res.enrollAddress ? `enroll with: virtkm-agent enroll --server ${res.enrollAddress.replace(/^(0\.0\.0\.0|\[::\]):/, 'SERVER_HOST:')} --token-file FILE --state-dir DIR\n` : ''}`,
      );
    });
  host
    .command('list')
    .description('list hosts')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const all: ReturnType<typeof hostView>[] = [];
      let tok = '';
      do {
        const res = await rpc((c) => c.hosts.listHosts.bind(c.hosts), { page: { pageSize: 500, pageToken: tok } });
        all.push(...res.hosts.map(hostView));
        tok = res.nextPageToken;
      } while (tok);
      out(!!o.json, all, () => table(['NAME', 'ID', 'STATE', 'AGENT', 'GUESTS', 'LAST SEEN'], all.map((h) => [h.name, h.id, h.state, h.connected ? 'connected' : 'offline', String(h.guests), h.last_seen_at || '-'])));
    });
  host
    .command('show <host>')
    .description('show a host and what its agent reported about the guests placed on it')
    .option('--json', 'machine-readable output')
    .action(async (ref: string, o: { json?: boolean }) => {
      const res = await rpc((c) => c.hosts.getHost.bind(c.hosts), { host: ref });
      const h = hostView(res.host!);
      const guests: ReturnType<typeof guestView>[] = [];
      let tok = '';
      do {
        const page: ListGuestsResponse = await rpc((c) => c.guests.listGuests.bind(c.guests), { page: { pageSize: 100, pageToken: tok }, namePrefix: '', host: h.name });
        guests.push(...page.guests.map((g) => guestView(g, false)));
        tok = page.nextPageToken;
      } while (tok);
      const view = { ...h, placed_guests: guests.map((g) => ({ name: g.name, phase: g.phase, reason: g.phase_reason, reported_at: g.reported_at })) };
      out(!!o.json, view, () =>
        Object.entries(h).map(([k, v]) => `${(k + ':').padEnd(18)} ${String(v) || '-'}`).join('\n') +
        '\n' +
        (guests.length ? '\n' + table(['GUEST', 'STATE', 'REASON'], guests.map((g) => [g.name, g.phase || '-', g.phase_reason])) : ''),
      );
    });
  host
    .command('revoke <host>')
    .description("revoke a host's certificate; its next call is refused")
    .action(async (ref: string) => {
      await rpc((c) => c.hosts.revokeHost.bind(c.hosts), { host: ref });
      io.stdout(`revoked host ${ref}\n`);
    });

  // ---- credential ----
  const credential = program.command('credential').description('admin and frontend credentials');
  credential
    .command('create <name>')
    .description('create a key pair here and get it certified; writes a credential bundle (0600)')
    .addOption(new Option('--role <role>', 'role').choices(['admin', 'frontend']).makeOptionMandatory())
    .requiredOption('--out <file>', 'where to write the bundle (must not exist)')
    .option('--days <days>', 'validity in days (default 365)')
    .action(async (name: string, o: { role: string; out: string; days?: string }) => {
      const kp = await generateTlsKeyPair();
      const res = await rpc((c) => c.credentials.issueCredential.bind(c.credentials), { name, role: o.role === 'admin' ? Role.ROLE_ADMIN : Role.ROLE_FRONTEND, publicKey: Buffer.from(kp.publicKeyDer), validDays: intOption('--days', o.days) });
      try {
        writeFileSync(o.out, formatCredentialBundle({ caCertPem: res.caCertificatePem, certPem: res.certificatePem, keyPem: kp.privateKeyPem }), { mode: 0o600, flag: 'wx' });
      } catch {
        throw new DomainError('failed_precondition', `cannot create ${o.out} (does it exist already?)`);
      }
      io.stdout(`wrote ${o.role} credential for ${name} to ${o.out} (serial ${res.serial})\n`);
    });
  credential
    .command('revoke <serial>')
    .description('revoke an admin or frontend certificate by serial')
    .action(async (serial: string) => {
      await rpc((c) => c.credentials.revokeCredential.bind(c.credentials), { serial });
      io.stdout(`revoked certificate ${serial}\n`);
    });

  // ---- audit ----
  const audit = program.command('audit').description('the hash-chained audit log');
  audit
    .command('list')
    .description('list audit events, oldest first')
    .option('--action <action>', 'only this action, e.g. key.release')
    .option('--target <id>', 'only events about this target')
    .option('--after <seq>', 'only events after this sequence number')
    .option('--limit <n>', 'at most n events (default 1000)')
    .option('--json', 'machine-readable output')
    .action(async (o: { action?: string; target?: string; after?: string; limit?: string; json?: boolean }) => {
      const limit = intOption('--limit', o.limit) || 1000;
      const all: AuditEvent[] = [];
      let tok = '';
      do {
        const res = await rpc((c) => c.audit.listAuditEvents.bind(c.audit), { page: { pageSize: Math.min(1000, limit - all.length), pageToken: tok }, action: o.action ?? '', target: o.target ?? '', afterSeq: BigInt(intOption('--after', o.after)) });
        all.push(...res.events);
        tok = res.nextPageToken;
      } while (tok && all.length < limit);
      const view = all.map((e) => ({ seq: e.seq.toString(), time: e.time, actor: e.actor, action: e.action, target: e.target, outcome: e.outcome, detail: JSON.parse(e.detailJson || '{}') as unknown, hash: e.hash }));
      out(!!o.json, view, () => table(['SEQ', 'TIME', 'ACTOR', 'ACTION', 'TARGET', 'OUTCOME'], view.map((e) => [e.seq, e.time, e.actor, e.action, e.target, e.outcome])));
    });
  audit
    .command('verify')
    .description('verify the hash chain of the audit log')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const r = await rpc((c) => c.audit.verifyAuditLog.bind(c.audit), {});
      const view = { ok: r.ok, events_checked: r.eventsChecked.toString(), first_bad_seq: r.firstBadSeq.toString(), problem: r.problem, head_hash: r.headHash };
      out(!!o.json, view, () =>
        r.ok ? `audit log OK: ${view.events_checked} events, head ${view.head_hash}\n` : `audit log BROKEN at event ${view.first_bad_seq}: ${view.problem} (${view.events_checked} events checked)\n`,
      );
      if (!r.ok) throw new ExitWith(EXIT_AUDIT_BROKEN);
    });

  // ---- unseal (issue 5) ----
  addUnsealCommands(program, rpc, out);

  // ---- key rotation (issue 4) ----
  addRotationCommands(program, { io, rpc, clients: connect });

  try {
    await program.parseAsync(argv, { from: 'user' });
    return 0;
  } catch (err) {
    if (err instanceof ExitWith) return err.code;
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    if (isDomainError(err)) {
      io.stderr(`virtkm: ${err.message}\n`);
      if (err.hint) io.stderr(`virtkm: hint: ${err.hint}\n`);
      return EXIT_OF_KIND[err.kind];
    }
    io.stderr(`virtkm: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  } finally {
    clients?.close();
  }
}

/** Parses an optional non-negative integer option (0 when absent). */
function intOption(flag: string, value: string | undefined): number {
  if (value === undefined) return 0;
  if (!/^\d{1,9}$/.test(value)) throw new DomainError('invalid_argument', `${flag} must be a non-negative integer`);
  return Number(value);
}

// ---- unseal (issue 5) ------------------------------------------------------------------

type Rpc = <Req, Res>(pick: (c: ApiClients) => UnaryMethod<Req, Res>, req: Req) => Promise<Res>;

function describeUnsealStatus(s: UnsealStatusResponse): string {
  if (!s.sealed) return `unsealed (master key sealed with ${s.sealer})\n`;
  const given = s.receivedIndices.length ? ` (shares ${s.receivedIndices.join(', ')})` : '';
  return `sealed: ${s.received} of the ${s.threshold} shares needed have been given${given}; a ${s.threshold}-of-${s.shares} ${s.sealer} set\n`;
}

/**
 * `virtkm unseal [--share-file FILE]` submits one share to a sealed server: read from a
 * file (owner-only, like every secret file) or asked on the terminal without echo, never
 * from argv or the environment; the bytes are wiped once sent. `virtkm unseal status`.
 */
function addUnsealCommands(program: Command, rpc: Rpc, out: (json: boolean, data: unknown, human: () => string) => void): void {
  const unseal = program
    .command('unseal')
    .description('submit your unseal share to a sealed server (Shamir); asked on the terminal unless --share-file')
    .option('--share-file <file>', 'file holding your share (mode 0600)')
    .option('--json', 'machine-readable output')
    .action(async (o: { shareFile?: string; json?: boolean }) => {
      const share = o.shareFile ? await readShareFile(o.shareFile) : await promptPassphrase('unseal share: ');
      let res: SubmitShareResponse;
      try {
        res = await rpc((c) => c.unseal.submitShare.bind(c.unseal), { share });
      } finally {
        wipe(share);
      }
      const s = res.status!;
      out(!!o.json, { accepted_index: res.acceptedIndex, sealed: s.sealed, received: s.received, threshold: s.threshold, shares: s.shares }, () =>
        `share ${res.acceptedIndex} accepted; ${s.sealed ? describeUnsealStatus(s) : 'the server is now unsealed\n'}`,
      );
    });
  unseal
    .command('status')
    .description('whether the server is sealed, and how many shares have been given')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const s = await rpc((c) => c.unseal.unsealStatus.bind(c.unseal), {});
      out(!!o.json, { sealed: s.sealed, sealer: s.sealer, threshold: s.threshold, shares: s.shares, received: s.received, received_indices: s.receivedIndices }, () => describeUnsealStatus(s));
    });
}

async function readShareFile(path: string): Promise<Buffer> {
  const { handle } = await openSecretFile(path, 'share file');
  try {
    const read = await readBounded(handle, MAX_SHARE_TEXT);
    try {
      if (read.tooLong) throw new DomainError('invalid_argument', 'the share file is too long to hold one share');
      return ownedCopy(read.buf.subarray(0, read.length));
    } finally {
      wipe(read.buf);
    }
  } finally {
    await handle.close();
  }
}
