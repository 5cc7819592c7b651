/**
 * An in-memory Libvirt for unit tests of the reconciler. It keeps the behaviour the
 * reconciler relies on: secrets must be defined before a value is set, a domain starts only
 * if every encrypted disk's secret exists and holds the image's key, destroy/undefine of
 * unknown names is not_found. test/integration/libvirt-adapter.test.ts checks the same
 * behaviour against the real libvirtd.
 */
import { DomainError } from '../../shared/src/errors.js';
import { parseVirtkmMarker } from '../../host-agent/src/libvirt/xml.js';
import { isPassphraseUtf8 } from '../../host-agent/src/libvirt/secret-value.js';
import type { DomainInfo, DomainState, Libvirt, SecretInfo } from '../../host-agent/src/libvirt/ports.js';

/** The fake and what tests inspect. */
export interface FakeLibvirt extends Libvirt {
  secretValues: Map<string, Buffer>;
  domainXml: Map<string, string>;
  states: Map<string, DomainState>;
  /** Image path -> the passphrase that opens it, consulted at start. */
  imageKeys: Map<string, Buffer>;
}

export function createFakeLibvirt(): FakeLibvirt {
  const secretMeta = new Map<string, SecretInfo>();
  const secretValues = new Map<string, Buffer>();
  const domainXml = new Map<string, string>();
  const states = new Map<string, DomainState>();
  const imageKeys = new Map<string, Buffer>();
  const notFound = (what: string) => new DomainError('not_found', `${what} not found`);
  return {
    secretValues,
    domainXml,
    states,
    imageKeys,
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
      },
      async destroy(name) {
        if (states.get(name) !== 'running') throw new DomainError('failed_precondition', 'domain is not running');
        states.set(name, 'shutoff');
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
    },
    async close() {},
  };
}
