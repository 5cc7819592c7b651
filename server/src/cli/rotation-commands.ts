/**
 * `virtkm` commands for key rotation (RotationService), registered by main.ts:
 *   volume|guest|host rotate REF, rotate --all   start rotations (and follow them: --wait)
 *   volume encrypt|decrypt VOLUME                convert raw <-> luks, qcow2 <-> qcow2-luks
 *                                                (rotations too: rotation watch/show/list)
 *   rotation list|show|watch                     what runs, ran or waits, with progress
 *   policy set|list|delete                       maximum key ages and re-encryption after moves
 * and the view `volume show` prints (key versions with their lifetimes, newest rotation).
 *
 * Following rotations uses WatchRotations with explicit ids: the server sends each one's
 * current state first, so a rotation that ends between the start and the watch is not
 * missed. On a terminal every rotation gets a live progress bar (cli-progress); otherwise
 * one line per change (logfmt, or one JSON object per line with --json), which scripts and
 * logs can read. Ctrl-C ends the watching, not the rotations.
 */
import { Metadata, type CallOptions, type ClientReadableStream, type ClientUnaryCall, type ServiceError } from '@grpc/grpc-js';
import cliProgress from 'cli-progress';
import { Option, type Command } from 'commander';
import {
  RotationKind,
  RotationState,
  type GetVolumeResponse,
  type ListRotationsResponse,
  type Rotation,
  type RotationPolicy,
  type RotationSelector,
  type WatchRotationsResponse,
} from '../../../shared/src/api.js';
import { DomainError, errors } from '../../../shared/src/errors.js';
import { fromServiceError } from '../../../shared/src/grpc-client.js';
import { formatDurationSeconds, parseDurationSeconds } from '../domain/duration.js';
import type { ApiClients } from './clients.js';
import { formatSize, table, toJson, volumeView } from './format.js';
import { NO_TERMINAL, type CliTerminal, type TerminalStream } from './terminal.js';

/** The 4-argument form of a generated unary client method. */
type UnaryMethod<Req, Res> = (req: Req, md: Metadata, opts: Partial<CallOptions>, cb: (err: ServiceError | null, res: Res) => void) => ClientUnaryCall;

/** What the rotation commands need from main(). */
export interface RotationCliContext {
  io: { stdout: (s: string) => void; stderr: (s: string) => void; terminal?: CliTerminal | undefined };
  /** One unary call with main's timeout and error mapping. */
  rpc: <Req, Res>(pick: (c: ApiClients) => UnaryMethod<Req, Res>, req: Req) => Promise<Res>;
  /** The connected clients (for the WatchRotations stream). */
  clients: () => ApiClients;
}

/** The server refuses to watch more ids in one call. */
const MAX_WATCH_IDS = 1000;
const KIND_NAMES: Readonly<Record<string, RotationKind>> = { rekey: RotationKind.ROTATION_KIND_REKEY, reencrypt: RotationKind.ROTATION_KIND_REENCRYPT };
const STATE_NAMES: Readonly<Record<string, RotationState>> = {
  queued: RotationState.ROTATION_STATE_QUEUED,
  running: RotationState.ROTATION_STATE_RUNNING,
  done: RotationState.ROTATION_STATE_DONE,
  failed: RotationState.ROTATION_STATE_FAILED,
};

/** Every kind a rotation may have (policies take KIND_NAMES only). */
const ALL_KIND_NAMES: Readonly<Record<string, RotationKind>> = { ...KIND_NAMES, encrypt: RotationKind.ROTATION_KIND_ENCRYPT, decrypt: RotationKind.ROTATION_KIND_DECRYPT };
const kindName = (k: RotationKind) => Object.entries(ALL_KIND_NAMES).find(([, v]) => v === k)?.[0] ?? 'unknown';
/** "v1 -> v2", "unencrypted -> v1" (encrypt), "v2 -> unencrypted" (decrypt); `pending` while the new version is not known. */
function versionsText(r: { kind: string; from_version: number; to_version: number }, pending = '?'): string {
  const from = r.kind === 'encrypt' ? 'unencrypted' : `v${r.from_version}`;
  const to = r.kind === 'decrypt' ? 'unencrypted' : r.to_version ? `v${r.to_version}` : pending;
  return `${from} -> ${to}`;
}
const stateName = (s: RotationState) => Object.entries(STATE_NAMES).find(([, v]) => v === s)?.[0] ?? 'unknown';
const ended = (r: Rotation | undefined) => r !== undefined && (r.state === RotationState.ROTATION_STATE_DONE || r.state === RotationState.ROTATION_STATE_FAILED);

// ---- views ---------------------------------------------------------------------------

/** A rotation as plain JSON-friendly data (64-bit numbers as strings). */
export function rotationView(r: Rotation) {
  return {
    id: r.id,
    volume_id: r.volumeId,
    volume: r.volumeName,
    kind: kindName(r.kind),
    state: stateName(r.state),
    reason: r.reason,
    from_version: r.fromVersion,
    to_version: r.toVersion,
    host: r.host,
    step: r.step,
    mechanism: r.mechanism,
    bytes_done: r.bytesDone.toString(),
    bytes_total: r.bytesTotal.toString(),
    bytes_per_second: r.bytesPerSecond.toString(),
    error: r.error,
    requested_by: r.requestedBy,
    created_at: r.createdAt,
    started_at: r.startedAt,
    finished_at: r.finishedAt,
  };
}

/** A policy as plain data; durations both in seconds and as typed ("90d"). */
export function policyView(p: RotationPolicy) {
  return {
    scope: p.scope,
    target: p.target,
    target_name: p.targetName,
    max_key_age_seconds: p.maxKeyAgeSeconds.toString(),
    max_key_age: formatDurationSeconds(Number(p.maxKeyAgeSeconds)),
    kind: kindName(p.kind),
    reencrypt_after_move_seconds: p.reencryptAfterMoveSeconds.toString(),
    reencrypt_after_move: formatDurationSeconds(Number(p.reencryptAfterMoveSeconds)),
    updated_at: p.updatedAt,
  };
}

/** What `volume show` prints: the volume, its key versions, its newest rotation. */
export function volumeShowView(res: GetVolumeResponse) {
  return { ...volumeView(res.volume!), rotation: res.rotation ? rotationView(res.rotation) : null };
}

/** Human form of `volume show`. */
export function formatVolumeShow(v: ReturnType<typeof volumeShowView>): string {
  const lines = [
    `name:        ${v.name}`,
    `id:          ${v.id}`,
    `size:        ${formatSize(BigInt(v.size_bytes))} (${v.size_bytes} bytes)`,
    `format:      ${v.format}`,
    `cipher:      ${v.cipher}, ${v.key_size_bits}-bit key, ${v.sector_size}-byte sectors`,
    `created:     ${v.created_at}`,
    `guests:      ${v.guests.join(', ') || '-'}`,
    v.active_key_version ? `key version: ${v.active_key_version} (active)` : 'key version: none (unencrypted)',
    ...v.key_versions.map((k) => {
      const life = [k.retired_at ? `retired ${k.retired_at}` : '', k.destroy_after ? `${k.state === 'destroyed' ? 'destroyed' : 'destroy after'} ${k.destroy_after}` : ''].filter(Boolean);
      return `  v${k.version}  ${k.state.padEnd(9)} ${k.created_at}${life.length ? `  ${life.join(', ')}` : ''}`;
    }),
  ];
  const r = v.rotation;
  if (r) {
    lines.push(`rotation:    ${r.id} ${r.state} (${r.kind}, reason ${r.reason}), ${versionsText(r)}`);
    if (r.state === 'running' || r.state === 'queued') lines.push(`  progress:  ${progressText(r)}`);
    if (r.mechanism) lines.push(`  mechanism: ${r.mechanism}${r.host ? ` on ${r.host}` : ''}`);
    if (r.error) lines.push(`  error:     ${r.error}`);
    lines.push(`  requested: ${r.created_at} by ${r.requested_by}${r.finished_at ? `; ended ${r.finished_at}` : ''}`);
  }
  return lines.join('\n') + '\n';
}

// ---- numbers for humans ----------------------------------------------------------------

/** Bytes with a binary unit and one decimal ("6.5 MiB"). */
export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** Seconds as "1h02m", "3m05s", "42s". */
export function humanSeconds(s: number): string {
  const t = Math.max(0, Math.round(s));
  if (t >= 3600) return `${Math.floor(t / 3600)}h${String(Math.floor((t % 3600) / 60)).padStart(2, '0')}m`;
  if (t >= 60) return `${Math.floor(t / 60)}m${String(t % 60).padStart(2, '0')}s`;
  return `${t}s`;
}

interface Progress {
  done: number;
  total: number;
  rate: number;
  /** Seconds left at the current rate; undefined when unknown. */
  eta: number | undefined;
}

function progressOf(r: { bytes_done: string; bytes_total: string; bytes_per_second: string }): Progress {
  const done = Number(r.bytes_done);
  const total = Number(r.bytes_total);
  const rate = Number(r.bytes_per_second);
  return { done, total, rate, eta: rate > 0 && total >= done ? (total - done) / rate : undefined };
}

/** "42% (6.5 MiB of 16.0 MiB) at 1.2 MiB/s, ETA 8s; copying" */
function progressText(r: ReturnType<typeof rotationView>): string {
  const p = progressOf(r);
  if (p.total === 0) return r.step || r.state;
  const pct = Math.floor((p.done / p.total) * 100);
  const rate = p.rate > 0 ? ` at ${humanBytes(p.rate)}/s` : '';
  const eta = p.eta !== undefined ? `, ETA ${humanSeconds(p.eta)}` : '';
  return `${pct}% (${humanBytes(p.done)} of ${humanBytes(p.total)})${rate}${eta}${r.step ? `; ${r.step}` : ''}`;
}

/** One logfmt line: key=value, values with blanks or quotes JSON-quoted. */
function logfmt(fields: [string, string | number][]): string {
  return fields.map(([k, v]) => `${k}=${typeof v === 'number' || /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v)}`).join(' ');
}

/** The machine-friendly line `rotation watch` prints for each change without a terminal. */
function changeLine(r: ReturnType<typeof rotationView>): string {
  const p = progressOf(r);
  const fields: [string, string | number][] = [
    ['time', new Date().toISOString()],
    ['rotation', r.id],
    ['volume', r.volume],
    ['kind', r.kind],
    ['state', r.state],
    ['step', r.step],
    ['done', r.bytes_done],
    ['total', r.bytes_total],
    ['rate', r.bytes_per_second],
    ['eta', p.eta !== undefined ? Math.round(p.eta) : '-'],
    ['host', r.host || '-'],
    ['mechanism', r.mechanism || '-'],
  ];
  if (r.error) fields.push(['error', r.error]);
  return logfmt(fields) + '\n';
}

/** What ends a rotation's line (or bar) for humans. */
function endText(r: ReturnType<typeof rotationView>): string {
  return r.state === 'done' ? `done: ${versionsText(r)}${r.mechanism ? ` by ${r.mechanism}` : ''}` : `failed: ${r.error || 'no reason given'}`;
}

// ---- following rotations ---------------------------------------------------------------

type FollowMode = 'bars' | 'lines' | 'json' | 'quiet';

/** Live bars on a terminal, one per rotation. */
class BarDisplay {
  readonly #multi: cliProgress.MultiBar;
  readonly #bars = new Map<string, cliProgress.SingleBar>();
  /** Width of the volume-name column: the longest name seen, at most 24. */
  #nameWidth: number;

  constructor(stream: TerminalStream, names: string[]) {
    this.#nameWidth = Math.min(24, Math.max(6, ...names.map((n) => n.length)));
    this.#multi = new cliProgress.MultiBar(
      {
        stream: stream as unknown as NodeJS.WritableStream,
        format: (options, params, payload: { view: ReturnType<typeof rotationView> }) => this.#line(options, params, payload.view),
        hideCursor: true,
        clearOnComplete: false,
        stopOnComplete: false,
        gracefulExit: false,
        barsize: 24,
        fps: 5,
      },
      cliProgress.Presets.shades_classic,
    );
  }

  #line(options: cliProgress.Options, params: cliProgress.Params, r: ReturnType<typeof rotationView>): string {
    const name = (r.volume || r.volume_id).slice(0, this.#nameWidth).padEnd(this.#nameWidth);
    const bar = cliProgress.Format.BarFormat(params.progress, options);
    if (r.state === 'done' || r.state === 'failed') return `${name} ${bar} ${endText(r)}`;
    const p = progressOf(r);
    if (r.state === 'queued' || p.total === 0) return `${name} ${bar} ${r.state}: ${r.step}`;
    const pct = `${Math.floor(params.progress * 100)}%`.padStart(4);
    const rate = p.rate > 0 ? `${humanBytes(p.rate)}/s` : '-';
    const eta = p.eta !== undefined ? humanSeconds(p.eta) : '-';
    return `${name} ${bar} ${pct} ${humanBytes(p.done)}/${humanBytes(p.total)}  ${rate}  ETA ${eta}  ${r.step}`;
  }

  update(r: Rotation): void {
    const view = rotationView(r);
    this.#nameWidth = Math.min(24, Math.max(this.#nameWidth, view.volume.length));
    const total = Math.max(1, Number(r.bytesTotal));
    // A finished rotation shows a full bar whatever its last progress report said.
    const value = r.state === RotationState.ROTATION_STATE_DONE ? total : Math.min(total, Number(r.bytesDone));
    const bar = this.#bars.get(r.id);
    if (!bar) {
      this.#bars.set(r.id, this.#multi.create(total, value, { view }));
    } else {
      bar.setTotal(total);
      bar.update(value, { view });
    }
  }

  stop(): void {
    // One last redraw so the final states are on screen, then release the terminal.
    this.#multi.update();
    this.#multi.stop();
  }
}

/**
 * Follows the rotations `ids` until each has ended (done or failed); resolves to their
 * final states, in the order of `ids`. Rejects on Ctrl-C or when the server goes away.
 */
async function follow(ctx: RotationCliContext, ids: string[], mode: FollowMode, names: string[] = []): Promise<Rotation[]> {
  const unique = [...new Set(ids)];
  if (unique.length === 0) return [];
  const clients = ctx.clients();
  const terminal = ctx.io.terminal ?? NO_TERMINAL;
  const latest = new Map<string, Rotation>();
  const display = mode === 'bars' ? new BarDisplay(terminal.stdoutStream, names) : undefined;
  const streams: ClientReadableStream<WatchRotationsResponse>[] = [];
  return new Promise<Rotation[]>((resolve, reject) => {
    let settled = false;
    let removeInterrupt = () => {};
    const finish = (err?: unknown) => {
      if (settled) return;
      settled = true;
      removeInterrupt();
      for (const s of streams) s.cancel();
      display?.stop();
      if (err) reject(err);
      else resolve(unique.map((id) => latest.get(id) as Rotation));
    };
    removeInterrupt = terminal.onInterrupt(() => finish(errors.precondition('interrupted: the rotations go on on the server', { hint: 'see them with: virtkm rotation list --state running --state queued' })));
    const onRotation = (r: Rotation) => {
      if (settled || !unique.includes(r.id)) return;
      latest.set(r.id, r);
      if (mode === 'bars') display?.update(r);
      else if (mode === 'lines') ctx.io.stdout(changeLine(rotationView(r)));
      else if (mode === 'json') ctx.io.stdout(JSON.stringify(rotationView(r)) + '\n');
      if (unique.every((id) => ended(latest.get(id)))) finish();
    };
    for (let i = 0; i < unique.length; i += MAX_WATCH_IDS) {
      // No deadline: a re-encryption may take hours; the stream ends when we cancel it.
      const s = clients.rotations.watchRotations({ ids: unique.slice(i, i + MAX_WATCH_IDS) }, new Metadata(), {});
      streams.push(s);
      s.on('data', (m: WatchRotationsResponse) => {
        if (m.rotation) onRotation(m.rotation);
      });
      s.on('error', (e: ServiceError) => finish(fromServiceError(e)));
      s.on('end', () => finish(new DomainError('unavailable', 'the server ended the watch before the rotations ended')));
    }
  });
}

/** How a follow shows progress: bars on a terminal, lines otherwise. */
function followMode(ctx: RotationCliContext, json: boolean): FollowMode {
  if (json) return 'json';
  return (ctx.io.terminal ?? NO_TERMINAL).stdoutIsTty ? 'bars' : 'lines';
}

/** Prints the tally after a follow; throws (exit 1) when any rotation failed. */
function settle(ctx: RotationCliContext, finals: Rotation[], print: boolean): void {
  const failed = finals.filter((r) => r.state === RotationState.ROTATION_STATE_FAILED);
  if (print && finals.length > 0) {
    ctx.io.stdout(`${finals.length} rotation${finals.length === 1 ? '' : 's'} ended: ${finals.length - failed.length} done, ${failed.length} failed\n`);
    for (const r of failed) ctx.io.stdout(`  ${r.volumeName} (${r.id}): ${endText(rotationView(r))}\n`);
  }
  if (failed.length > 0) throw errors.precondition(`${failed.length} of ${finals.length} rotation${finals.length === 1 ? '' : 's'} failed`, { hint: 'virtkm rotation show ID tells why; the volume still opens with its active key' });
}

// ---- commands --------------------------------------------------------------------------

interface StartOptions {
  /** Set by `volume encrypt|decrypt`; otherwise --reencrypt/--rekey decide. */
  kind?: RotationKind;
  reencrypt?: boolean;
  rekey?: boolean;
  reason?: string;
  wait?: boolean;
  json?: boolean;
}

/** The options every `... rotate` command takes. */
function withStartOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--reencrypt', 'a new data key: every block is rewritten (default for --reason compromise)').conflicts('rekey'))
    .addOption(new Option('--rekey', 'a new keyslot passphrase, metadata only (default otherwise)').conflicts('reencrypt'))
    .option('--reason <text>', 'why: "manual" (default), "compromise" (first in line; the old key is destroyed once the new one is confirmed) or free text')
    .option('--wait', 'follow the rotations until they end; exit 1 if any failed')
    .option('--json', 'machine-readable output');
}

async function startRotations(ctx: RotationCliContext, selector: RotationSelector, o: StartOptions): Promise<void> {
  const kind = o.kind ?? (o.reencrypt ? RotationKind.ROTATION_KIND_REENCRYPT : o.rekey ? RotationKind.ROTATION_KIND_REKEY : RotationKind.ROTATION_KIND_UNSPECIFIED);
  const res = await ctx.rpc((c) => c.rotations.startRotation.bind(c.rotations), { selector, kind, reason: o.reason ?? '' });
  const started = res.rotations.map(rotationView);
  if (o.json && !o.wait) {
    ctx.io.stdout(toJson({ rotations: started, skipped: res.skipped }) + '\n');
    return;
  }
  if (!o.json) {
    if (started.length === 0) ctx.io.stdout('no rotation started\n');
    else {
      const first = started[0] as (typeof started)[number];
      ctx.io.stdout(`started ${started.length} rotation${started.length === 1 ? '' : 's'} (${first.kind}, reason ${first.reason}):\n`);
      ctx.io.stdout(table(['ID', 'VOLUME', 'STATE', 'VERSIONS', 'STEP'], started.map((r) => [r.id, r.volume, r.state, versionsText(r), r.state === 'done' ? endText(r) : r.step])));
    }
    if (res.skipped.length > 0) ctx.io.stdout(`skipped (a rotation of theirs is already queued or running): ${res.skipped.join(', ')}\n`);
  }
  if (!o.wait) return;
  const finals = await follow(ctx, res.rotations.map((r) => r.id), o.json ? 'quiet' : followMode(ctx, false), res.rotations.map((r) => r.volumeName));
  if (o.json) ctx.io.stdout(toJson({ rotations: finals.map(rotationView), skipped: res.skipped }) + '\n');
  settle(ctx, finals, !o.json);
}

/** Finds a command main.ts registered (volume, guest, host). */
function commandNamed(program: Command, name: string): Command {
  return program.commands.find((c) => c.name() === name) ?? program.command(name);
}

/** Registers the rotation commands on `program` (after main's volume/guest/host groups). */
export function addRotationCommands(program: Command, ctx: RotationCliContext): void {
  const { io, rpc } = ctx;
  const out = (json: boolean | undefined, data: unknown, human: () => string) => io.stdout(json ? toJson(data) + '\n' : human());

  // ---- starting ----
  withStartOptions(commandNamed(program, 'volume').command('rotate <volume>').description("replace a volume's key (by name or id)")).action((ref: string, o: StartOptions) =>
    startRotations(ctx, { target: { $case: 'volume', value: ref } }, o),
  );
  withStartOptions(commandNamed(program, 'guest').command('rotate <guest>').description('replace the keys of all volumes of a guest')).action((ref: string, o: StartOptions) =>
    startRotations(ctx, { target: { $case: 'guest', value: ref } }, o),
  );
  withStartOptions(commandNamed(program, 'host').command('rotate <host>').description('replace the keys of all volumes of the guests placed on a host')).action((ref: string, o: StartOptions) =>
    startRotations(ctx, { target: { $case: 'host', value: ref } }, o),
  );
  withStartOptions(program.command('rotate').description('replace the keys of every volume (--all), e.g. after a suspected leak: --all --reason compromise'))
    .option('--all', 'every volume (required: use volume|guest|host rotate for fewer)')
    .option('--yes', 'do not ask for confirmation (required when stdin is not a terminal)')
    .action(async (o: StartOptions & { all?: boolean; yes?: boolean }) => {
      if (!o.all) throw errors.invalid('rotate needs --all', { hint: 'to rotate fewer keys use: virtkm volume|guest|host rotate NAME' });
      if (!o.yes) {
        const terminal = io.terminal ?? NO_TERMINAL;
        if (!terminal.stdinIsTty) throw errors.invalid('refusing to rotate every volume without confirmation', { hint: 'add --yes (stdin is not a terminal to ask on)' });
        const what = o.reencrypt ? 're-encrypt' : o.rekey ? 'rekey' : o.reason?.trim() === 'compromise' ? 're-encrypt' : 'rekey';
        const ok = await terminal.confirm(`${what} EVERY volume (reason: ${o.reason?.trim() || 'manual'})? [y/N] `);
        if (!ok) throw errors.precondition('not confirmed: nothing was rotated');
      }
      await startRotations(ctx, { target: { $case: 'all', value: true } }, o);
    });

  // ---- encrypting and decrypting ----
  // Rotations of their own kind (server-side, audited as volume.encrypt.* / volume.decrypt.*);
  // one volume at a time, followed like any rotation with --wait or `rotation watch`.
  const volumeCmd = commandNamed(program, 'volume');
  volumeCmd
    .command('encrypt <volume>')
    .description('encrypt an unencrypted volume: raw -> luks, qcow2 -> qcow2-luks (offline with the guest stopped, live while it runs)')
    .option('--reason <text>', 'why (free text, default "manual")')
    .option('--wait', 'follow the conversion until it ends; exit 1 if it failed')
    .option('--json', 'machine-readable output')
    .action((ref: string, o: StartOptions) => startRotations(ctx, { target: { $case: 'volume', value: ref } }, { ...o, kind: RotationKind.ROTATION_KIND_ENCRYPT }));
  volumeCmd
    .command('decrypt <volume>')
    .description("remove a volume's encryption: luks -> raw, qcow2-luks -> qcow2; its key is retired (destroyed after the grace period)")
    .option('--yes', 'confirm: the data is stored unencrypted afterwards (required when stdin is not a terminal)')
    .option('--reason <text>', 'why; "compromise" destroys the key as soon as the image is decrypted')
    .option('--wait', 'follow the conversion until it ends; exit 1 if it failed')
    .option('--json', 'machine-readable output')
    .action(async (ref: string, o: StartOptions & { yes?: boolean }) => {
      if (!o.yes) {
        const terminal = io.terminal ?? NO_TERMINAL;
        if (!terminal.stdinIsTty) throw errors.invalid('decrypting lowers the protection of the volume: its data is stored unencrypted afterwards', { hint: 'confirm with --yes' });
        const ok = await terminal.confirm(`decrypt volume ${ref}: its data will be stored UNENCRYPTED? [y/N] `);
        if (!ok) throw errors.precondition('not confirmed: nothing was changed');
      }
      await startRotations(ctx, { target: { $case: 'volume', value: ref } }, { ...o, kind: RotationKind.ROTATION_KIND_DECRYPT });
    });

  // ---- rotation list / show / watch ----
  const rotation = program.command('rotation').description('key rotations: queued, running, done and failed');
  rotation
    .command('list')
    .description('list rotations, newest first')
    .addOption(new Option('--state <state...>', 'only these states (repeatable)').choices(Object.keys(STATE_NAMES)))
    .option('--volume <volume>', 'only rotations of this volume (name or id)')
    .option('--limit <n>', 'at most n rotations (default 1000)')
    .option('--json', 'machine-readable output')
    .action(async (o: { state?: string[]; volume?: string; limit?: string; json?: boolean }) => {
      if (o.limit !== undefined && !/^[1-9]\d{0,8}$/.test(o.limit)) throw errors.invalid('--limit must be a positive integer');
      const limit = o.limit ? Number(o.limit) : 1000;
      const states = (o.state ?? []).map((s) => STATE_NAMES[s] as RotationState);
      const all: ReturnType<typeof rotationView>[] = [];
      let token = '';
      do {
        const res: ListRotationsResponse = await rpc((c) => c.rotations.listRotations.bind(c.rotations), { page: { pageSize: Math.min(500, limit - all.length), pageToken: token }, states, volume: o.volume ?? '' });
        all.push(...res.rotations.map(rotationView));
        token = res.nextPageToken;
      } while (token && all.length < limit);
      out(o.json, all, () =>
        table(
          ['ID', 'VOLUME', 'KIND', 'STATE', 'REASON', 'VERSIONS', 'HOST', 'PROGRESS', 'CREATED'],
          all.map((r) => [r.id, r.volume, r.kind, r.state, r.reason, versionsText(r), r.host || '-', r.state === 'done' ? r.mechanism || '-' : r.state === 'failed' ? r.error : progressText(r), r.created_at]),
        ),
      );
    });
  rotation
    .command('show <id>')
    .description('show one rotation')
    .option('--json', 'machine-readable output')
    .action(async (id: string, o: { json?: boolean }) => {
      const res = await rpc((c) => c.rotations.getRotation.bind(c.rotations), { id });
      const r = rotationView(res.rotation!);
      out(o.json, r, () =>
        [
          `id:         ${r.id}`,
          `volume:     ${r.volume} (${r.volume_id})`,
          `kind:       ${r.kind}`,
          `state:      ${r.state}`,
          `reason:     ${r.reason}`,
          `versions:   ${versionsText(r, '(not yet)')}`,
          `host:       ${r.host || '-'}`,
          `mechanism:  ${r.mechanism || '-'}`,
          `step:       ${r.step || '-'}`,
          `progress:   ${r.state === 'running' ? progressText(r) : `${r.bytes_done} of ${r.bytes_total} bytes`}`,
          ...(r.error ? [`error:      ${r.error}`] : []),
          `requested:  ${r.created_at} by ${r.requested_by}`,
          `started:    ${r.started_at || '-'}`,
          `ended:      ${r.finished_at || '-'}`,
        ].join('\n') + '\n',
      );
    });
  rotation
    .command('cancel <id>')
    .description('cancel a queued rotation (a running one cannot be cancelled)')
    .option('--json', 'machine-readable output')
    .action(async (id: string, o: { json?: boolean }) => {
      const res = await rpc((c) => c.rotations.cancelRotation.bind(c.rotations), { id });
      const r = rotationView(res.rotation!);
      out(o.json, r, () => `rotation ${r.id} of ${r.volume} cancelled\n`);
    });
  rotation
    .command('watch [ids...]')
    .description('follow rotations (default: those queued or running now) until they end: live bars on a terminal, else one line per change')
    .option('--json', 'one JSON object per change and line')
    .action(async (ids: string[], o: { json?: boolean }) => {
      let watched = ids;
      let names: string[] = [];
      if (watched.length === 0) {
        const open: Rotation[] = [];
        let token = '';
        do {
          const res: ListRotationsResponse = await rpc((c) => c.rotations.listRotations.bind(c.rotations), { page: { pageSize: 500, pageToken: token }, states: [RotationState.ROTATION_STATE_QUEUED, RotationState.ROTATION_STATE_RUNNING], volume: '' });
          open.push(...res.rotations);
          token = res.nextPageToken;
        } while (token);
        if (open.length === 0) {
          if (!o.json) io.stdout('no rotation is queued or running\n');
          return;
        }
        watched = open.map((r) => r.id);
        names = open.map((r) => r.volumeName);
      }
      const mode = followMode(ctx, !!o.json);
      const finals = await follow(ctx, watched, mode, names);
      settle(ctx, finals, mode === 'bars');
    });

  // ---- policies ----
  const policy = program.command('policy').description('rotation policies: maximum key age, kind, re-encryption after a move');
  const scopeOf = (o: { global?: boolean; volume?: string; guest?: string }): { scope: string; target: string } => {
    const given = [o.global ? 1 : 0, o.volume !== undefined ? 1 : 0, o.guest !== undefined ? 1 : 0].reduce((a, b) => a + b, 0);
    if (given !== 1) throw errors.invalid('give exactly one of --global, --volume VOLUME, --guest GUEST');
    if (o.global) return { scope: 'global', target: '' };
    return o.volume !== undefined ? { scope: 'volume', target: o.volume } : { scope: 'guest', target: o.guest as string };
  };
  const withScope = (cmd: Command) => cmd.option('--global', 'the global policy (volumes without their own or a guest policy)').option('--volume <volume>', "a volume's own policy").option('--guest <guest>', "the policy of a guest's volumes");
  withScope(policy.command('set').description('set a policy; fields not given keep their current value (or none)'))
    .option('--max-age <duration>', 'maximum age of an active key, e.g. 90d, 12w, 1y; 0: no limit')
    .addOption(new Option('--kind <kind>', 'what scheduled rotations do').choices(Object.keys(KIND_NAMES)))
    .option('--reencrypt-after-move <duration>', 're-encrypt volumes within this time after their guest moved, e.g. 1d; 0: never')
    .option('--json', 'machine-readable output')
    .action(async (o: { global?: boolean; volume?: string; guest?: string; maxAge?: string; kind?: string; reencryptAfterMove?: string; json?: boolean }) => {
      const { scope, target } = scopeOf(o);
      if (o.maxAge === undefined && o.kind === undefined && o.reencryptAfterMove === undefined) {
        throw errors.invalid('nothing to set', { hint: 'give --max-age, --kind or --reencrypt-after-move' });
      }
      const maxAge = o.maxAge === undefined ? undefined : parseDurationSeconds(o.maxAge, '--max-age');
      const afterMove = o.reencryptAfterMove === undefined ? undefined : parseDurationSeconds(o.reencryptAfterMove, '--reencrypt-after-move');
      // SetRotationPolicy replaces the whole policy: keep what the admin did not name.
      const { policies } = await rpc((c) => c.rotations.listRotationPolicies.bind(c.rotations), {});
      const current = policies.find((p) => p.scope === scope && (scope === 'global' || p.target === target || p.targetName === target));
      const res = await rpc((c) => c.rotations.setRotationPolicy.bind(c.rotations), {
        policy: {
          scope,
          target,
          targetName: '',
          maxKeyAgeSeconds: maxAge !== undefined ? BigInt(maxAge) : (current?.maxKeyAgeSeconds ?? 0n),
          kind: o.kind ? (KIND_NAMES[o.kind] as RotationKind) : (current?.kind ?? RotationKind.ROTATION_KIND_REKEY),
          reencryptAfterMoveSeconds: afterMove !== undefined ? BigInt(afterMove) : (current?.reencryptAfterMoveSeconds ?? 0n),
          updatedAt: '',
        },
      });
      const p = policyView(res.policy!);
      out(o.json, p, () => `set ${describePolicyScope(p)} policy: max key age ${p.max_key_age === '0' ? 'unlimited' : p.max_key_age}, kind ${p.kind}, re-encrypt after a move ${p.reencrypt_after_move === '0' ? 'never' : `within ${p.reencrypt_after_move}`}\n`);
    });
  policy
    .command('list')
    .description('list rotation policies')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const { policies } = await rpc((c) => c.rotations.listRotationPolicies.bind(c.rotations), {});
      const all = policies.map(policyView);
      out(o.json, all, () =>
        table(
          ['SCOPE', 'TARGET', 'MAX AGE', 'KIND', 'REENCRYPT AFTER MOVE', 'UPDATED'],
          all.map((p) => [p.scope, p.target_name || p.target || '-', p.max_key_age === '0' ? '-' : p.max_key_age, p.kind, p.reencrypt_after_move === '0' ? '-' : p.reencrypt_after_move, p.updated_at]),
        ),
      );
    });
  withScope(policy.command('delete').description('delete a policy'))
    .action(async (o: { global?: boolean; volume?: string; guest?: string }) => {
      const { scope, target } = scopeOf(o);
      await rpc((c) => c.rotations.deleteRotationPolicy.bind(c.rotations), { scope, target });
      io.stdout(`deleted the ${scope === 'global' ? 'global' : `${scope} ${target}`} policy\n`);
    });
}

function describePolicyScope(p: ReturnType<typeof policyView>): string {
  return p.scope === 'global' ? 'the global' : `the ${p.scope} ${p.target_name || p.target}`;
}
