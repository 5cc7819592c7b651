/**
 * Process warnings for command-line entry points.
 */

/**
 * grpc-js passes the target host as TLS servername, and Node warns (DEP0123) when that is
 * an IP address, once per process. The certificate check itself still runs against the IP
 * SANs, so the warning is noise for a CLI talking to 127.0.0.1:PORT; all other warnings
 * are printed as usual.
 */
export function silenceIpServernameWarning(): void {
  process.removeAllListeners('warning');
  process.on('warning', (w: Error & { code?: string }) => {
    if (w.code !== 'DEP0123') process.stderr.write(`${w.name}: ${w.message}\n`);
  });
}
