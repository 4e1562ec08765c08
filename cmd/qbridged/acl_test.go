package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// TestPrintRedisACLMatchesREADME: the ACL README.md shows is what
// --print-redis-acl prints for that prefix and user, so the documented
// least-privilege user cannot drift from the commands qbridge sends.
func TestPrintRedisACLMatchesREADME(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	const cmd = "qbridged --print-redis-acl --key-prefix qb: --redis-username qbridge"
	text := string(readme)
	i := strings.Index(text, cmd)
	if i < 0 {
		t.Fatalf("README.md no longer shows %q", cmd)
	}
	rest := text[i:]
	start := strings.Index(rest, "```text\n")
	if start < 0 {
		t.Fatal("README.md: no ```text block after the --print-redis-acl command")
	}
	rest = rest[start+len("```text\n"):]
	documented := strings.Join(strings.Fields(rest[:strings.Index(rest, "```")]), " ")

	var out bytes.Buffer
	cfg, err := parseConfig(strings.Fields(cmd)[1:], func(string) string { return "" }, &out)
	if err != nil {
		t.Fatal(err)
	}
	printRedisACL(&out, cfg)
	var printed string
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(line, "ACL SETUSER ") {
			printed = line
		}
	}
	if printed == "" {
		t.Fatalf("--print-redis-acl printed no ACL SETUSER line:\n%s", out.String())
	}
	if documented != printed {
		t.Errorf("README.md's ACL differs from --print-redis-acl:\nREADME:  %s\nprinted: %s", documented, printed)
	}
}
