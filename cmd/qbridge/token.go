package main

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"strings"

	"github.com/spf13/cobra"

	"github.com/qbridge/qbridge/server/auth"
)

// tokenBytes is the randomness of a new token: 256 bits, so that a fast
// hash of it (what qbridged stores) cannot be reversed by guessing.
const tokenBytes = 32

func (a *app) tokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Make bearer tokens for qbridged's principals",
		Long: `A principal in qbridged's config file is known by the hashes of its bearer
tokens; qbridged never stores a token. "token new" makes a random token and
prints it with its hash; "token hash" prints the hash of a token read from
stdin. Give the token to the caller (QBRIDGE_TOKEN, --token, or the clients'
token option) and put the hash in the principal's tokens list.`,
		Example: `  qbridge token new
  printf %s "$TOKEN" | qbridge token hash`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	newCmd := &cobra.Command{
		Use:     "new",
		Short:   "Print a new random token and its hash",
		Example: "  qbridge token new\n  qbridge -o json token new | jq -r .hash",
		Args:    cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			b := make([]byte, tokenBytes)
			if _, err := rand.Read(b); err != nil {
				return err
			}
			tok := "qbt_" + base64.RawURLEncoding.EncodeToString(b)
			return a.printToken(tok, true)
		},
	}
	hashCmd := &cobra.Command{
		Use:     "hash",
		Short:   "Print the hash of the token on stdin (for the config file)",
		Example: `  printf %s "$TOKEN" | qbridge token hash`,
		Args:    cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			line, err := bufio.NewReader(a.stdin).ReadString('\n')
			tok := strings.TrimSpace(line)
			if tok == "" {
				if err != nil && line == "" {
					return usageErrorf("no token on stdin: printf %%s \"$TOKEN\" | qbridge token hash")
				}
				return usageErrorf("the token on stdin is empty")
			}
			return a.printToken(tok, false)
		},
	}
	cmd.AddCommand(newCmd, hashCmd)
	return cmd
}

// printToken prints the hash of tok, and tok itself when it is new.
func (a *app) printToken(tok string, isNew bool) error {
	h := auth.HashToken(tok)
	if !isNew {
		return a.out.emit(map[string]string{"hash": h}, func() string { return h + "\n" })
	}
	return a.out.emit(map[string]string{"token": tok, "hash": h}, func() string {
		return "token: " + tok + "\nhash:  " + h + "\n"
	})
}
