/**
 * An in-memory Libvirt for unit tests of the reconciler. It keeps the behaviour the
 * reconciler relies on: secrets must be defined before a value is set, a domain starts only
 * if every encrypted disk's secret exists and holds the image's key, destroy/undefine of
 * unknown names is not_found. Block copies: a running domain's disks are read from its
 * XML at start; a copy advances a quarter of the disk per blockJob call, is ready when
 * done, and a pivot switches the live disk (and, as libvirt 9 does, the persistent
 * definition) to the destination. test/integration/libvirt-adapter.test.ts checks the same
 * behaviour against the real libvirtd.
 */
import { DomainError } from '../../shared/src/errors.js';
import { parseDomainDisks, parseVirtkmMarker } from '../../host-agent/src/libvirt/xml.js';
import { isPassphraseUtf8 } from '../../host-agent/src/libvirt/secret-value.js';
import type { BlockJobInfo, DomainDisk, DomainInfo, DomainState, Libvirt, SecretInfo } from '../../host-agent/src/libvirt/ports.js';

/** The fake and what tests inspect. */
export interface FakeLibvirt extends Libvirt {
  secretValues: Map<string, Buffer>;
  domainXml: Map<string, string>;
  states: Map<string, DomainState>;
  /** Image path -> the passphrase that opens it, consulted at start. */
  imageKeys: Map<string, Buffer>;
  /** Live disks of running domains (domain -> target -> disk), set at start. */
  liveDisks: Map<string, Map<string, DomainDisk>>;
  /** Block jobs of running domains (`domain/target` -> job). */
  blockJobs: Map<string, BlockJobInfo & { dest: { path: string | undefined; secretUuid: string | undefined } }>;
}

/** Size the fake pretends every disk has, for block job progress. */
const FAKE_DISK_BYTES = 64n * 1024n * 1024n;

export function createFakeLibvirt(): FakeLibvirt {
  const secretMeta = new Map<string, SecretInfo>();
  const secretValues = new Map<string, Buffer>();
  const domainXml = new Map<string, string>();
  const states = new Map<string, DomainState>();
  const imageKeys = new Map<string, Buffer>();
  const liveDisks = new Map<string, Map<string, DomainDisk>>();
  const blockJobs: FakeLibvirt['blockJobs'] = new Map();
  const running = (name: string): boolean => states.get(name) === 'running' || states.get(name) === 'paused';
  const liveDisk = (name: string, target: string): DomainDisk => {
    if (!domainXml.has(name)) throw notFound('domain');
    if (!running(name)) throw new DomainError('failed_precondition', 'domain is not running');
    const disk = liveDisks.get(name)?.get(target);
    if (!disk) throw new DomainError('invalid_argument', `disk ${target} not found`);
    return disk;
  };
  const notFound = (what: string) => new DomainError('not_found', `${what} not found`);
  return {
    secretValues,
    domainXml,
    states,
    imageKeys,
    liveDisks,
    blockJobs,
    secrets: {
      async define(def) {
        secretMeta.set(def.uuid, { uuid: def.uuid, usageType: 'volume', usageId: `virtkm:${def.volumeId}`, volumeId: def.volumeId, description: def.description, private: true, ephemeral: true });
      },
      async setValue(uuid, value) {
        if (!secretMeta.has(uuid)) throw notFound('secret');
        // As the real adapter: QEMU only takes UTF-8 passphrases without NUL bytes.
        if (!isPassphraseUtf8(value)) throw new DomainError('invalid_argument', 'secret value must be valid UTF-8 without NUL bytes');
        secretValues.set(uuid, Buffer.from(value));
      },
      async undefine(uuid) {
        if (!secretMeta.delete(uuid)) throw notFound('secret');
        secretValues.get(uuid)?.fill(0);
        secretValues.delete(uuid);
      },
      async list() {
        return [...secretMeta.values()];
      },
    },
    domains: {
      async define(xml) {
        const name = /<name>([^<]+)<\/name>/.exec(xml)?.[1];
        if (!name) throw new DomainError('invalid_argument', 'domain has no name');
        domainXml.set(name, xml);
        if (!states.has(name)) states.set(name, 'shutoff');
        return { uuid: `uuid-${name}`, name };
      },
      async undefine(name) {
        if (!domainXml.delete(name)) throw notFound('domain');
        states.delete(name);
      },
      async start(name) {
        const xml = domainXml.get(name);
        if (!xml) throw notFound('domain');
        if (states.get(name) === 'running') throw new DomainError('failed_precondition', 'domain is already running');
        for (const m of xml.matchAll(/<source file="([^"]+)"\/>\s*<encryption format="luks">\s*<secret type="passphrase" uuid="([^"]+)"\/>/g)) {
          const [, path, uuid] = m as unknown as [string, string, string];
          const value = secretValues.get(uuid);
          const key = imageKeys.get(path);
          if (!value || !key || !value.equals(key)) throw new DomainError('failed_precondition', 'cannot unlock the disk: wrong key');
        }
        states.set(name, 'running');
        liveDisks.set(name, new Map(parseDomainDisks(xml).map((d) => [d.target, d])));
      },
      async destroy(name) {
        if (states.get(name) !== 'running') throw new DomainError('failed_precondition', 'domain is not running');
        states.set(name, 'shutoff');
        liveDisks.delete(name);
        for (const key of [...blockJobs.keys()]) if (key.startsWith(`${name}/`)) blockJobs.delete(key);
      },
      async state(name) {
        return states.get(name);
      },
      async list(): Promise<DomainInfo[]> {
        return [...domainXml.entries()].map(([name, xml]) => ({ name, uuid: `uuid-${name}`, state: states.get(name) ?? 'shutoff', autostart: false, persistent: true, marker: parseVirtkmMarker(xml) }));
      },
      async xml(name) {
        const x = domainXml.get(name);
        if (!x) throw notFound('domain');
        return x;
      },
      async disk(name, target) {
        if (!domainXml.has(name)) throw notFound('domain');
        const live = liveDisks.get(name);
        const disk = live ? live.get(target) : parseDomainDisks(domainXml.get(name) ?? '').find((d) => d.target === target);
        if (!disk) return undefined;
        const job = blockJobs.get(`${name}/${target}`);
        return { ...disk, mirror: job && job.type === 'copy' ? { ...job.dest, ready: job.ready } : undefined };
      },
      async blockCopy(name, target, destXml, options) {
        liveDisk(name, target);
        if (blockJobs.has(`${name}/${target}`)) throw new DomainError('failed_precondition', 'disk has a block job');
        if (!options.transientJob) throw new DomainError('failed_precondition', 'a copy of a persistent domain needs a transient job');
        const dest = parseDomainDisks(`<domain><devices>${destXml.replace(/<disk([^>]*)>/, "<disk$1><target dev='x'/>")}</devices></domain>`)[0];
        if (!dest?.sourcePath) throw new DomainError('invalid_argument', 'destination has no source file');
        if (dest.secretUuid !== undefined && !secretValues.has(dest.secretUuid)) throw new DomainError('failed_precondition', "a disk's libvirt secret is missing or has no value");
        blockJobs.set(`${name}/${target}`, { type: 'copy', cur: 0n, end: FAKE_DISK_BYTES, bandwidth: 0, ready: false, dest: { path: dest.sourcePath, secretUuid: dest.secretUuid } });
      },
      async blockJob(name, target) {
        liveDisk(name, target);
        const job = blockJobs.get(`${name}/${target}`);
        if (!job) return undefined;
        const snapshot = { type: job.type, cur: job.cur, end: job.end, bandwidth: job.bandwidth, ready: job.ready };
        job.cur = job.cur + job.end / 4n >= job.end ? job.end : job.cur + job.end / 4n;
        if (job.cur === job.end) job.ready = true;
        return snapshot;
      },
      async blockJobAbort(name, target, options) {
        const disk = liveDisk(name, target);
        const key = `${name}/${target}`;
        const job = blockJobs.get(key);
        if (!job) throw new DomainError('failed_precondition', 'no active block job');
        if (options.pivot) {
          if (!job.ready) throw new DomainError('failed_precondition', 'block job is not ready');
          liveDisks.get(name)?.set(target, { ...disk, sourcePath: job.dest.path, secretUuid: job.dest.secretUuid });
          const xml = domainXml.get(name) ?? '';
          if (disk.sourcePath && job.dest.path) domainXml.set(name, xml.split(disk.sourcePath).join(job.dest.path).split(disk.secretUuid ?? '\0').join(job.dest.secretUuid ?? ''));
        }
        blockJobs.delete(key);
      },
    },
    async close() {},
  };
}
