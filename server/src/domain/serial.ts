/** Certificate serials as stored and compared: lower-case hex without leading zeros. */

/** Normalises a serial: Node prints serials upper-case and may pad them with zeros. */
export function normalizeSerial(serial: string): string {
  const s = serial.toLowerCase().replace(/[^0-9a-f]/g, '').replace(/^0+/, '');
  return s === '' ? '0' : s;
}
