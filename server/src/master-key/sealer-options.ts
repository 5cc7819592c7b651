/**
 * Option values of the sealer factories (registry.ts), as commander parsed them. A module
 * of its own so the sealers and the registry that lists them do not import each other.
 */

/** Option values by camel-case name. */
export type SealerOptionValues = Readonly<Record<string, unknown>>;

/** A non-empty string option, or undefined. */
export function optionString(options: SealerOptionValues, key: string): string | undefined {
  const v = options[key];
  return typeof v === 'string' && v !== '' ? v : undefined;
}
