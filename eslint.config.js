// Lint configuration. Generated code (shared/src/gen) and build output are excluded.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

/** server/ and host-agent/ depend on shared/ only, never on each other. */
const layerRule = (forbidden) => ({
  'no-restricted-imports': [
    'error',
    {
      patterns: [
        {
          group: [`**/${forbidden}/**`, `${forbidden}/**`],
          message: `server/ and host-agent/ must not import each other; move shared code to shared/.`,
        },
      ],
    },
  ],
});

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', 'shared/src/gen/**', 'coverage/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: 'readonly', console: 'readonly', Buffer: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly', setImmediate: 'readonly', setInterval: 'readonly', clearInterval: 'readonly', URL: 'readonly', AbortController: 'readonly' } },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/consistent-type-imports': 'error',
      'no-console': 'off',
    },
  },
  { files: ['server/**'], rules: layerRule('host-agent') },
  { files: ['host-agent/**'], rules: layerRule('server') },
  { files: ['shared/**'], rules: { 'no-restricted-imports': ['error', { patterns: [{ group: ['**/server/**', '**/host-agent/**'], message: 'shared/ must not depend on server/ or host-agent/.' }] }] } },
);
