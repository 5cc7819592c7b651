/**
 * The lint rule that keeps server/ and host-agent/ apart actually fires.
 */
import test from 'ava';
import { ESLint } from 'eslint';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const eslint = new ESLint({ cwd: root });

async function restrictedImports(file: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath: join(root, file) });
  return (result?.messages ?? []).filter((m) => m.ruleId === 'no-restricted-imports').map((m) => m.message);
}

test('server/ may not import host-agent/, and the reverse', async (t) => {
  t.is((await restrictedImports('server/src/x.ts', "import { a } from '../../host-agent/src/a.js';\nexport { a };\n")).length, 1);
  t.is((await restrictedImports('host-agent/src/x.ts', "import { a } from '../../server/src/a.js';\nexport { a };\n")).length, 1);
  t.is((await restrictedImports('shared/src/x.ts', "import { a } from '../../server/src/a.js';\nexport { a };\n")).length, 1);
});

test('both may import shared/', async (t) => {
  t.deepEqual(await restrictedImports('server/src/x.ts', "import { a } from '../../shared/src/a.js';\nexport { a };\n"), []);
  t.deepEqual(await restrictedImports('host-agent/src/x.ts', "import { a } from '../../shared/src/a.js';\nexport { a };\n"), []);
});
