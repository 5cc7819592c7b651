/**
 * render-domain: how managed disks appear in the domain XML the agent defines, for the
 * unencrypted formats (raw, qcow2: the image file, its driver type, no <encryption> even
 * if the stored XML had one) next to an encrypted one (the file and the volume's secret).
 */
import test from 'ava';
import { renderDomainXml, type HostVolume } from '../../host-agent/src/reconcile/render-domain.js';

const xml = `<domain type='kvm'><name>g</name><devices>
<disk type='volume' device='disk'><driver cache='none'/><source pool='virtkm' volume='plain-raw'/><target dev='vda' bus='virtio'/></disk>
<disk type='volume' device='disk'><source pool='virtkm' volume='plain-qcow2'/><encryption format='luks'><secret type='passphrase' uuid='11111111-1111-4111-8111-111111111111'/></encryption><target dev='vdb' bus='virtio'/></disk>
<disk type='volume' device='disk'><source pool='virtkm' volume='secret-luks'/><target dev='vdc' bus='virtio'/></disk>
</devices></domain>`;

const vols: HostVolume[] = [
  { volumeId: 'id-raw', name: 'plain-raw', format: 'raw', path: '/img/id-raw.img', secretUuid: 'unused-1' },
  { volumeId: 'id-q', name: 'plain-qcow2', format: 'qcow2', path: '/img/id-q.qcow2', secretUuid: 'unused-2' },
  { volumeId: 'id-l', name: 'secret-luks', format: 'luks', path: '/img/id-l.img', secretUuid: '22222222-2222-4222-8222-222222222222' },
];

/** The <disk> element whose target is `dev`. */
function diskOf(out: string, dev: string): string {
  const d = [...out.matchAll(/<disk\b[\s\S]*?<\/disk>/g)].map((m) => m[0]).find((x) => x.includes(`dev="${dev}"`));
  if (!d) throw new Error(`no disk ${dev} in ${out}`);
  return d;
}

test('raw and qcow2 volumes become file disks with their driver type and no encryption; luks keeps its secret', async (t) => {
  const out = await renderDomainXml({ xml, guestId: 'gid', hostId: 'hid', name: 'g', generation: 3n, volumes: vols });
  const raw = diskOf(out, 'vda');
  t.regex(raw, /<disk type="file" device="disk">/);
  t.regex(raw, /<driver cache="none" name="qemu" type="raw"\/>/, 'driver attributes kept, type raw');
  t.regex(raw, /<source file="\/img\/id-raw.img"\/>/);
  t.notRegex(raw, /encryption|secret/);
  const q = diskOf(out, 'vdb');
  t.regex(q, /<driver name="qemu" type="qcow2"\/>/);
  t.regex(q, /<source file="\/img\/id-q.qcow2"\/>/);
  t.notRegex(q, /encryption|secret/, 'a stale <encryption> of the stored XML is dropped');
  const l = diskOf(out, 'vdc');
  t.regex(l, /<driver name="qemu" type="raw"\/>/);
  t.regex(l, /<encryption format="luks">\s*<secret type="passphrase" uuid="22222222-2222-4222-8222-222222222222"\/>/);
  t.notRegex(out, /pool="virtkm"/, 'no managed reference is left');
  t.regex(out, /<virtkm:guest xmlns:virtkm="urn:virtkm:1" id="gid" generation="3" host="hid"\/>/);
});
