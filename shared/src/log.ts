/**
 * Structured JSON logs, one object per line on stderr. Fields are restricted to primitive
 * values by type, and byte arrays or objects that slip through at run time are replaced by
 * a marker, so a secret buffer cannot end up in a log line by accident.
 */

/** Log levels in increasing severity. */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const LEVEL_RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** Values a log field may hold. */
export type LogValue = string | number | boolean | bigint | null | undefined;
/** The fields of one log line. */
export type LogFields = Record<string, LogValue>;

/** A logger bound to a component. */
export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  child(component: string): Logger;
}

/** Options of createLogger. */
export interface LoggerOptions {
  component: string;
  level?: LogLevel;
  /** Where lines go; default process.stderr. */
  write?: (line: string) => void;
  /** Clock, for tests. */
  now?: () => Date;
}

function safeValue(v: unknown): unknown {
  if (v === null || v === undefined) return v;
  switch (typeof v) {
    case 'string':
    case 'number':
    case 'boolean':
      return v;
    case 'bigint':
      return v.toString();
    default:
      // Buffers, Uint8Arrays and objects are never logged: they may hold secrets.
      return '[redacted]';
  }
}

/** Describes an error for the log: name and message, never the object itself. */
export function describeError(err: unknown): LogFields {
  if (err instanceof Error) {
    const cause = err.cause instanceof Error ? `${err.cause.name}: ${err.cause.message}` : undefined;
    return { error: `${err.name}: ${err.message}`, cause, stack: err.stack?.split('\n').slice(1, 4).join(' | ') };
  }
  return { error: String(err) };
}

/** Creates a JSON-lines logger. */
export function createLogger(options: LoggerOptions): Logger {
  const min = LEVEL_RANK[options.level ?? 'info'];
  const write = options.write ?? ((line: string) => process.stderr.write(line + '\n'));
  const now = options.now ?? (() => new Date());
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (LEVEL_RANK[level] < min) return;
    const record: Record<string, unknown> = { time: now().toISOString(), level, component: options.component, msg };
    if (fields) for (const [k, v] of Object.entries(fields)) if (v !== undefined) record[k] = safeValue(v);
    write(JSON.stringify(record));
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (component) => createLogger({ ...options, component: `${options.component}.${component}` }),
  };
}

/** A logger that drops everything (tests). */
export const silentLogger: Logger = createLogger({ component: 'silent', level: 'error', write: () => undefined });
